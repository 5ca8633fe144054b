"""Sweeps over the continuum with Optuna (the only place Optuna lives), in layers:

- :mod:`~continuum.sweep.settings`: :class:`SweepConfig`, each setting declared once; flags, files, validation;
- :mod:`~continuum.sweep.points`: grid points, the search space, a point's model, who holds a grid point;
- :mod:`~continuum.sweep.record`: :class:`TrialRecord`, whose fields are the results columns;
- :mod:`~continuum.sweep.storage`: Optuna storages (SQLite, journal file, PostgreSQL) kept alive;
- :mod:`~continuum.sweep.objective`: trains one point per trial and records it;
- :mod:`~continuum.sweep.tables`: the results tables, kept current after every trial;
- :mod:`~continuum.sweep.study`: open, resume, exactly once, run;
- :mod:`~continuum.sweep.workers` / :mod:`~continuum.sweep.worker`: local worker processes;
- :mod:`~continuum.sweep.cli` (``python -m continuum.sweep``): the command line.

This package's own namespace stays empty, so that importing one layer does not import the ones above it.
"""
