"""One worker process of ``--workers N`` (started by :func:`continuum.sweep.workers.run_workers`)::

    python -m continuum.sweep.worker CONFIG_JSON NUMBER

runs the sweep of the validated config it is given (see :meth:`SweepConfig.to_json`) on the parent's storage,
quietly, writing the tables and summary after each of its trials; the parent draws the plots and prints the table.
``NUMBER`` (1 .. N) seeds its search sampler apart from the other workers'. SIGTERM stops it as Ctrl-C does,
SIGUSR1 after its epoch in progress (:mod:`continuum.sweep.signals`).
"""

from __future__ import annotations

import sys
from typing import Sequence

from continuum.report import write_summary
from continuum.sweep.cli import prepare, quiet_logs
from continuum.sweep.settings import SweepConfig
from continuum.sweep.signals import install_stop_handlers
from continuum.sweep.study import run


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker for ``argv == [CONFIG_JSON, NUMBER]``; returns the exit code (130 when interrupted)."""
    payload, number = sys.argv[1:] if argv is None else argv
    quiet_logs(quiet=True)
    install_stop_handlers()
    cfg = SweepConfig.from_json(payload)
    try:
        run(cfg, prepare(cfg), progress=False, after_export=write_summary, worker=int(number))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
