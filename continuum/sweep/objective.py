"""The objective: trains one point per trial and records its :class:`~continuum.sweep.record.TrialRecord`."""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import optuna
import timm
import torch
from optuna.trial import TrialState

from continuum.checkpoint import save_checkpoint
from continuum.cost import measure_latency, model_cost
from continuum.data import TensorData
from continuum.knobs import SegmentError
from continuum.strategy import TUNER, strategies_fingerprint
from continuum.sweep.points import INTERRUPTED, GridPoint, TrialFailed, build_model, creation_kwargs, grid_point, \
    matched, search_point, show_point, varied_knobs
from continuum.sweep.record import encode_correct, point_cells, record
from continuum.sweep.settings import OBJECTIVES, SweepConfig
from continuum.sweep.signals import stop_requested
from continuum.timing import device_name
from continuum.tracking import Trackers
from continuum.train import TrainingFailed, curve_summary, discard_snapshot, fit, resolve_device, resolve_precision

log = logging.getLogger("continuum.sweep")


def worker_id(pid: int | None = None) -> str:
    """``host:pid`` of process ``pid`` on this host (default: this one), as recorded on its trials."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]  # the checkout holding continuum/
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", "continuum"]).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def environment(device: torch.device) -> dict[str, object]:
    """What a trial's numbers may depend on besides the code: the device, threads and library versions."""
    cuda = device.type == "cuda"
    return {"device": device_name(device), "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__, "optuna": optuna.__version__,
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": str(torch.backends.cudnn.version()) if cuda else None}


class Objective:
    """Trains one point per trial and records everything about it on the trial.

    Args:
        cfg: the sweep.
        data: the dataset, loaded once for all trials; a search's trials never score its test split (they choose;
            ``retrain`` scores the configurations they chose).
        progress: show a tqdm bar per trial.
    """

    def __init__(self, cfg: SweepConfig, data: TensorData, progress: bool) -> None:
        self.cfg = cfg
        data = data if cfg.search == "grid" else data.without_test()
        self.data = data
        self.progress = progress
        self.trial_number = -1  # the trial this worker runs or ran last
        self.device = resolve_device(cfg.train.device)
        self.context = {
            "dataset": cfg.data.dataset, "train_size": len(data.train_y), "val_size": len(data.val_y),
            "test_size": None if data.test_y is None else len(data.test_y), "epochs": cfg.train.epochs,
            "batch_size": cfg.train.batch_size, "recipe": cfg.train.recipe, "warmup_epochs": cfg.train.warmup_epochs,
            "weight_decay": cfg.train.resolved_weight_decay,
            "precision": resolve_precision(cfg.train.precision, self.device), "channels_last": cfg.train.channels_last,
            "compile": cfg.train.compile, "latency_batch": cfg.latency_batch, "git": _git_commit(),
            "worker": worker_id(),
        } | environment(self.device)
        self.settings = {k: self.context[k] for k in ("dataset", "train_size", "epochs", "batch_size", "recipe",
                                                      "weight_decay")}
        self.folder = Path(cfg.out) / cfg.study
        self.trackers = Trackers(cfg.trackers)

    def configure(self, trial: optuna.Trial) -> GridPoint:
        """The trial's point (width-matched when ``match_params`` or ``match_flops`` is set), its learning rate
        (the recipe's unless set) and its seed."""
        if self.cfg.search == "grid":
            self.resume_first(trial)
            point = grid_point(trial, self.cfg.retry_failed)
        else:
            point = search_point(trial, self.cfg)
        point = point._replace(config=matched(point.config, self.cfg, self.data),
                               lr=replace(self.cfg.train, lr=point.lr).resolved_lr)
        if self.cfg.search == "grid":
            show_point(trial, point.config, point.lr, varied_knobs(self.cfg))
        return point

    def snapshot(self, trial: optuna.Trial) -> Path | None:
        """Where a trial saves its training state after each epoch: its point's (:meth:`saved_state`); ``None`` for
        a search trial whose point another live trial holds (:func:`~continuum.sweep.points.search_point`).

        Args:
            trial: the running trial.
        """
        point = trial.user_attrs.get("point")
        return None if point is None else self.saved_state(point)

    def saved_state(self, point: str) -> Path:
        """Where the point ``point`` (its key) saves its training state after each epoch, named by the point and the
        data: a rerun of an interrupted point resumes from there.

        Args:
            point: the point's key (:func:`~continuum.sweep.points.point_key`).
        """
        run = [point, self.context["dataset"], self.context["train_size"], self.context["val_size"]]
        return self.folder / "snapshots" / f"{hashlib.sha256(repr(run).encode()).hexdigest()[:20]}.pt"

    def resume_first(self, trial: optuna.Trial) -> None:
        """Give a grid trial whose point has no saved state the first queued point that has one, so that stopped
        points finish before new ones start: a study stopped and resumed many times then holds at most one
        unfinished point per worker, not one per point.

        The queued trial of that point later stands down as its duplicate (:func:`grid_point`), and the point given
        up is queued again; two workers taking the same point at once are settled the same way.

        Args:
            trial: the trial just taken from the queue.
        """
        point = trial.user_attrs.get("point")
        if point is None or self.saved_state(point).exists():
            return
        study = trial.study
        running = {t.user_attrs.get("point") for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.number != trial.number}
        for queued in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            saved = queued.user_attrs.get("point")
            if saved is not None and saved not in running and self.saved_state(saved).exists():
                log.info("trial %d resumes the saved state of the point queued as trial %d first", trial.number,
                         queued.number)
                trial.set_user_attr("point", saved)
                return

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        start = time.perf_counter()
        self.trial_number = trial.number
        for key, value in trial.user_attrs.items():  # a retried trial inherits its stale original's records
            if key != "point" and value is not None:
                trial.set_user_attr(key, None)
        config, lr, seed = self.configure(trial)
        train = replace(self.cfg.train, lr=lr)
        knobs = config.to_dict() | {"lr": lr, "seed": seed}
        trial.set_user_attr("config", knobs)
        record(trial, lr=lr, **self.context)
        hparams = {k: "none" if v is None else v for k, v in point_cells(knobs).items()}
        self.trackers.start_trial(trial.number, hparams | self.settings, self.folder)
        curve: list[dict] = []
        final: dict = {}

        def on_epoch(metrics: dict) -> None:
            curve.append(metrics)
            trial.set_user_attr("curve", curve)
            summary = curve_summary(curve) | {"wall_s": time.perf_counter() - start}
            final.update(summary)
            record(trial, **summary)  # only what this epoch changed: each value is one storage write
            self.trackers.log_epoch(metrics["epoch"], metrics)
            if len(self.cfg.objectives) == 1:
                trial.report(metrics["val_acc"], metrics["epoch"])
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {metrics['epoch']}")

        state = "FAIL"
        try:
            torch.manual_seed(seed)
            model = build_model(config, self.data)
            cost = model_cost(model, self.data.input_size)
            costs = {"params": cost.params, "macs": cost.macs, "flops": cost.flops}
            final.update(costs)
            record(trial, **costs)
            with TUNER.recording() as strategies:
                result = fit(model, self.data, train, seed, on_epoch, self.progress, f"trial {trial.number}",
                             self.snapshot(trial), stop_requested)
                # after training, so that this trial's own training does not slow it; other work still may: recorded
                latency = measure_latency(model, self.data.input_size, self.cfg.latency_batch, self.device, 2, 5)
            measured = {"latency_ms": latency.median_ms, "latency_load": latency.other_load,
                        "conv_strategies": strategies_fingerprint(strategies),
                        "resumed_epochs": result.resumed_epochs}
            if result.test_correct is not None:
                measured |= {"test_acc": result.test_acc, "test_loss": result.test_loss,
                             "test_correct": encode_correct(result.test_correct)}
            final.update(measured)
            record(trial, **measured)
            if self.cfg.save_models:
                save_checkpoint(self.folder / "models" / f"trial_{trial.number:04d}.pt", model, config.model,
                                creation_kwargs(config, self.data), {"trial": trial.number, **hparams})
            state = "COMPLETE"
        except (TrainingFailed, SegmentError) as err:
            self._fail(trial, str(err))
        except torch.cuda.OutOfMemoryError:
            self._fail(trial, f"CUDA out of memory at batch size {self.cfg.train.batch_size}; lower --batch-size")
        except optuna.TrialPruned:
            state = "PRUNED"
            if (snapshot := self.snapshot(trial)) is not None:
                discard_snapshot(snapshot)  # a pruned point is not rerun
            raise
        except KeyboardInterrupt:
            record(trial, fail_reason=INTERRUPTED)
            raise
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it (our heartbeat lapsed)
            raise
        except Exception as err:  # an unexpected error stops the sweep; the table says why, not "no heartbeat"
            record(trial, fail_reason=f"{type(err).__name__}: {str(err).strip()[:300]}")
            raise
        finally:
            self.trackers.end_trial(state, final)
        result = tuple(final[OBJECTIVES[name].column] for name in self.cfg.objectives)
        return result[0] if len(result) == 1 else result

    @staticmethod
    def _fail(trial: optuna.Trial, reason: str) -> None:
        log.warning("trial %d failed: %s", trial.number, reason)
        record(trial, fail_reason=reason)
        raise TrialFailed(reason)
