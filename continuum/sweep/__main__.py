"""``python -m continuum.sweep``: see :mod:`continuum.sweep.cli`."""

import sys

from continuum.sweep.cli import main

sys.exit(main())
