"""One worker process of ``--workers N`` (started by :func:`continuum.sweep.workers.run_workers`)::

    python -m continuum.sweep.worker CONFIG_JSON NUMBER

runs the sweep of the validated config it is given (see :meth:`SweepConfig.to_json`) on the parent's storage,
quietly, writing the tables and summary after each of its trials, and leaves once no trial of the study is free to
start (the parent gives its place to the next study with one); the parent draws the plots and prints the table.
``NUMBER`` (1, 2, ... per study) seeds its search sampler apart from the other workers'. SIGTERM stops it as Ctrl-C
does, SIGUSR1 after its epoch in progress (:mod:`continuum.sweep.signals`). A study it refuses (a point that does not
build or fit, an unreadable ``lr_study``) exits with code 2 and one line.
"""

from __future__ import annotations

import sys
from typing import Sequence

from continuum.data import DataError
from continuum.report import write_summary
from continuum.sweep.cli import prepare, quiet_logs
from continuum.sweep.settings import SweepConfig
from continuum.sweep.signals import install_stop_handlers
from continuum.sweep.study import run
from continuum.sweep.workers import BAD_INPUT_EXIT_CODE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker for ``argv == [CONFIG_JSON, NUMBER]``; returns the exit code (130 when interrupted, 2 when it
    refuses the study)."""
    payload, number = sys.argv[1:] if argv is None else argv
    quiet_logs(quiet=True)
    install_stop_handlers()
    cfg = SweepConfig.from_json(payload)
    try:
        data = prepare(cfg)
    except (ValueError, DataError) as err:
        print(f"error: study {cfg.study}: {err}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    try:
        run(cfg, data, progress=False, after_export=write_summary, worker=int(number), wait=False)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
