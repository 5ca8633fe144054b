"""``python -m continuum COMMAND ...``: the ``continuum`` command (see :mod:`continuum.cli`)."""

import sys

from continuum.cli import main

sys.exit(main())
