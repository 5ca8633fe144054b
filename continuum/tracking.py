"""Experiment trackers: loggers a sweep calls for every trial, knowing nothing of Optuna.

A tracker is told when a trial starts (its number, its settings as flat hyper-parameters, the study's folder), after
every epoch (:class:`~continuum.train.EpochMetrics` as a dict) and when it ends (its state and final metrics). Built
in: ``tensorboard`` (one run folder per trial under ``STUDY/tensorboard/``, HParams view filled) and ``mlflow`` (one
run per trial in an experiment named after the study, at ``$MLFLOW_TRACKING_URI`` or ``STUDY/mlruns``). Your own is a
subclass of :class:`Tracker` named as ``module:Class`` (see the README's "Tracking" section for a W&B one).
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Tracker:
    """What a sweep calls for each trial; override the methods you need (each does nothing here).

    Calls come from the process that trains the trial, in order: :meth:`start_trial`, :meth:`log_epoch` per epoch,
    :meth:`end_trial` (also for a failed, pruned or interrupted trial). An exception in a tracker is logged and
    does not stop the sweep.
    """

    def start_trial(self, trial: int, hparams: dict[str, Any], folder: Path) -> None:
        """A trial starts.

        Args:
            trial: its number in the study.
            hparams: its point and the study's fixed settings, flat (``segments``, ``order``, ``lr``, ...), values
                as text, numbers or booleans.
            folder: the study's results folder.
        """

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """An epoch ended; ``metrics`` holds train/val loss and accuracy, the learning rate and images/s."""

    def end_trial(self, state: str, metrics: dict[str, Any]) -> None:
        """The trial ended as ``state`` (``COMPLETE``, ``FAIL``, ``PRUNED``) with its final ``metrics`` (the
        recorded columns: ``val_acc``, ``params``, ``macs``, ``latency_ms``, ...; fewer for a failed trial)."""


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of ``metrics`` (no text, no missing values)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker(Tracker):
    """Logs each trial to ``STUDY/tensorboard/trial_NNNN/``: scalars per epoch and the HParams view (settings and
    final metrics). Watch with ``tensorboard --logdir results/STUDY/tensorboard``."""

    def __init__(self) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer_class = SummaryWriter
        self.writer = None
        self.hparams: dict[str, Any] = {}

    def start_trial(self, trial: int, hparams: dict[str, Any], folder: Path) -> None:
        self.writer = self.writer_class(log_dir=str(folder / "tensorboard" / f"trial_{trial:04d}"))
        self.hparams = hparams

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        for name, value in scalars(metrics).items():
            if name != "epoch":
                self.writer.add_scalar(name, value, epoch)

    def end_trial(self, state: str, metrics: dict[str, Any]) -> None:
        final = {f"final/{name}": value for name, value in scalars(metrics).items()}
        self.writer.add_hparams(self.hparams | {"state": state}, final, run_name=".")
        self.writer.close()


class MLflowTracker(Tracker):
    """Logs each trial as an MLflow run in the experiment named after the study: settings as params, metrics per
    epoch, final metrics, the run's status. Tracks to ``$MLFLOW_TRACKING_URI``, else the folder ``STUDY/mlruns``
    (MLflow's file store: ``mlflow ui --backend-store-uri results/STUDY/mlruns``)."""

    def __init__(self) -> None:
        import mlflow  # pip install -e ".[mlflow]"

        self.mlflow = mlflow

    def start_trial(self, trial: int, hparams: dict[str, Any], folder: Path) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a folder, safe for several workers; MLflow 3 asks to opt in to it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (folder / "mlruns").resolve().as_uri()
        self.mlflow.set_tracking_uri(uri)
        self.mlflow.set_experiment(folder.name)
        self.mlflow.start_run(run_name=f"trial {trial}")
        self.mlflow.log_params(hparams)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics({k: v for k, v in scalars(metrics).items() if k != "epoch"}, step=epoch)

    def end_trial(self, state: str, metrics: dict[str, Any]) -> None:
        self.mlflow.log_metrics({f"final_{name}": value for name, value in scalars(metrics).items()})
        self.mlflow.end_run(status={"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED"))


BUILT_IN = {"tensorboard": (TensorBoardTracker, "tensorboard"), "mlflow": (MLflowTracker, "mlflow")}
"""Trackers by name, with the extra that installs what each needs (``pip install -e ".[NAME]"``)."""


def make_tracker(name: str) -> Tracker:
    """The tracker ``name``: ``tensorboard``, ``mlflow``, or ``module:Class`` (a :class:`Tracker` subclass made
    with no arguments).

    Raises:
        ValueError: an unknown name, a package that is not installed, or a class that cannot be made.
    """
    if name in BUILT_IN:
        tracker_class, extra = BUILT_IN[name]
        try:
            return tracker_class()
        except ImportError as err:
            raise ValueError(f"tracker {name}: {err.name or err} is not installed; pip install -e \".[{extra}]\"") \
                from None
    module_name, colon, class_name = name.partition(":")
    if not colon or not module_name or not class_name:
        raise ValueError(f"tracker {name!r} is not valid; use tensorboard, mlflow or module:Class")
    try:
        tracker_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"tracker {name}: cannot import it ({type(err).__name__}: {err})") from None
    if not (isinstance(tracker_class, type) and issubclass(tracker_class, Tracker)):
        raise ValueError(f"tracker {name}: not a subclass of continuum.tracking.Tracker")
    try:
        return tracker_class()
    except Exception as err:
        raise ValueError(f"tracker {name}: cannot make it ({type(err).__name__}: {err})") from None


class Trackers:
    """Several trackers called as one; a tracker that raises is logged (once per trial) and skipped.

    Args:
        names: tracker names (see :func:`make_tracker`).
    """

    def __init__(self, names: tuple[str, ...] = ()) -> None:
        self.trackers = {name: make_tracker(name) for name in names}
        self.broken: set[str] = set()

    def _each(self, method: str, *args: Any) -> None:
        for name, tracker in self.trackers.items():
            if name in self.broken:
                continue
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # a logger must never stop the sweep
                log.warning("tracker %s failed in %s (%s: %s); skipped for this trial", name, method,
                            type(err).__name__, err)
                self.broken.add(name)

    def start_trial(self, trial: int, hparams: dict[str, Any], folder: Path) -> None:
        self.broken = set()
        self._each("start_trial", trial, hparams, folder)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._each("log_epoch", epoch, metrics)

    def end_trial(self, state: str, metrics: dict[str, Any]) -> None:
        self._each("end_trial", state, metrics)
