"""Sweep the continuum: train every point of a grid (or a search) with Optuna, store honest results tables.

Examples:
  python -m continuum.sweep --segments 1,4,16,all                  # small net, Fashion-MNIST, ~5 min on 2 cores
  python -m continuum.sweep --segments 1,4,16,all                  # again: resumes, completed points are skipped
  python -m continuum.sweep --segments 1,8,all --order depthwise_first,pointwise_first --seeds 0,1,2
  python -m continuum.sweep --mid-act none,elu,relu --residual on,off --epochs 10 --study ablations
  python -m continuum.sweep --segments 1,2,4,8,16,32,all --match-params 300000
  python -m continuum.sweep --search nsga2 --n-trials 40 --objectives val_acc,latency
  python -m continuum.sweep --config experiments/spectrum.toml
  python -m continuum.sweep --dataset cifar10 --device cuda --storage postgresql://user@host/continuum

Results go to OUT/STUDY/: trials.csv (+ .parquet), curves.csv, summary.md, plots; the Optuna study lives in
OUT/STUDY/study.db unless --storage names another database. Rerunning the same command resumes the study.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import optuna
import timm
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

import continuum
from continuum.allocator import keep_freed_memory
from continuum.block import SegmentError
from continuum.config import OBJECTIVES, DataConfig, ModelConfig, SweepConfig, TrainConfig, parse_bool
from continuum.cost import measure_latency, model_cost
from continuum.data import DataError, TensorData, load_dataset
from continuum.report import write_report, write_summary
from continuum.results import study_frames, write_tables
from continuum.storage import default_storage, move_sqlite_study_to_journal, open_storage
from continuum.train import TrainingFailed, fit, resolve_device

log = logging.getLogger("continuum.sweep")

MATCH_TOLERANCE = 0.02
"""``--match-params`` accepts widths giving the target parameter count within this fraction."""

STAGES = 3
"""Parts whose knobs a search sets separately: the small net's stages, or Xception's entry/middle/exit flows."""

DUPLICATE = "duplicate"
"""``fail_reason`` prefix of a trial that stood down because another trial had its grid point."""

WORKER_LOST = "worker lost"
"""``fail_reason`` prefix of a trial whose local worker process died under ``--workers N``."""

INTERRUPTED = "interrupted"
"""``fail_reason`` of a trial stopped by Ctrl-C; such points are rerun on resume, unlike lasting failures."""

TRANSIENT_FAILURES = (INTERRUPTED, DUPLICATE, WORKER_LOST)
"""``fail_reason`` prefixes that say nothing about the point itself: it runs again."""

AXES = {"segments": "segments", "order": "orders", "mid_act": "mid_acts", "residual": "residuals",
        "width": "widths", "model": "models", "seeds": "seeds", "objectives": "objectives"}
"""Command-line / experiment-file names of the list-valued settings -> ``SweepConfig`` fields."""

SEARCH_DEFAULTS = {"segments": (1, 2, 4, 8, 16, 32, "all"), "orders": ("depthwise_first", "pointwise_first"),
                   "mid_acts": (None, "relu", "elu"), "residuals": (True, False),
                   "widths": (0.5, 0.75, 1.0, 1.25, 1.5)}
"""What a search explores on an axis the command leaves out."""


class TrialFailed(Exception):
    """A trial that failed for a recorded reason; the sweep goes on."""


# ----------------------------------------------------------------------------------------------------------- settings

def _split(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _seed(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"seed {value!r} is not valid; use ints such as 0,1,2") from None


def _number(kind: type):
    def parse(value: Any) -> Any:
        if value is None or value == "":
            return None
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a valid {kind.__name__}") from None
    return parse


ITEM_PARSERS = {"seeds": _seed, "widths": _number(float), "residuals": parse_bool}
SCALAR_PARSERS = {"epochs": _number(int), "batch_size": _number(int), "lr": _number(float),
                  "weight_decay": _number(float), "train_size": _number(int), "val_size": _number(int),
                  "n_trials": _number(int), "match_params": _number(int), "heartbeat": _number(int),
                  "drop_rate": _number(float), "latency_batch": _number(int), "label_smoothing": _number(float),
                  "workers": _number(int)}
TRAIN_FIELDS = set(TrainConfig.__dataclass_fields__)
DATA_FIELDS = set(DataConfig.__dataclass_fields__)


def read_experiment(path: Path) -> dict[str, Any]:
    """Settings from a TOML experiment file: the command-line names (``segments``, ``order``, ``epochs``, ...),
    flat or under ``[data]`` / ``[train]`` tables.

    Raises:
        ValueError: the file is missing or not valid TOML.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        settings = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"--config {path}: not valid TOML ({err})") from None
    flat = {k.replace("-", "_"): v for k, v in settings.items() if not isinstance(v, dict)}
    for table in ("data", "train"):
        flat |= {k.replace("-", "_"): v for k, v in settings.get(table, {}).items()}
    return flat


def build_config(settings: dict[str, Any]) -> SweepConfig:
    """A validated ``SweepConfig`` from command-line/experiment-file settings (names as on the command line).

    Raises:
        ValueError: an unknown setting or a bad value, naming it.
    """
    sweep: dict[str, Any] = {}
    train: dict[str, Any] = {}
    data: dict[str, Any] = {}
    for key, value in settings.items():
        if value is None:
            continue
        if key in AXES:
            parse = ITEM_PARSERS.get(AXES[key], lambda v: v)
            sweep[AXES[key]] = tuple(parse(v) for v in _split(value))
            continue
        value = SCALAR_PARSERS.get(key, lambda v: v)(value)
        if key in TRAIN_FIELDS:
            train[key] = value
        elif key in DATA_FIELDS:
            data[key] = value
        elif key in SweepConfig.__dataclass_fields__:
            sweep[key] = value
        else:
            raise ValueError(f"unknown setting {key!r}")
    if sweep.get("search", "grid") != "grid":
        for axis, values in SEARCH_DEFAULTS.items():
            sweep.setdefault(axis, values)
        if sweep["search"] == "nsga2":
            sweep.setdefault("objectives", ("val_acc", "flops"))
    return SweepConfig.from_dict(sweep | {"train": TrainConfig.from_dict(train), "data": DataConfig.from_dict(data)})


# -------------------------------------------------------------------------------------------------------------- models

def build_model(config: ModelConfig, data: TensorData) -> torch.nn.Module:
    """The model of one point, sized for ``data`` (channels, classes).

    Raises:
        ValueError: unknown model, a knob the model does not take, or a segment count its layers cannot take.
    """
    if not timm.is_model(config.model):
        raise ValueError(f"model {config.model!r} is not registered; continuum's are "
                         f"{', '.join(timm.list_models('continuum_*'))}")
    kwargs = config.model_kwargs()
    try:
        return timm.create_model(config.model, num_classes=data.num_classes, in_chans=data.input_size[0], **kwargs)
    except TypeError as err:
        raise ValueError(f"model {config.model} does not take these settings ({err}); sweep its own knobs only") \
            from None


def _divisor(segments: Any) -> int:
    counts = [s for s in (segments if isinstance(segments, tuple) else (segments,)) if isinstance(s, int)]
    return math.lcm(*counts) if counts else 1


def match_width(config: ModelConfig, target: int, data: TensorData) -> ModelConfig:
    """The config with the width whose parameter count is closest to ``target`` (widths rounded to multiples of the
    segment count, so the count stays valid).

    Raises:
        ValueError: the model has no width knob, or no width comes within 2 % of ``target``.
    """
    def params(width: float) -> tuple[int, ModelConfig]:
        candidate = ModelConfig(**(config.to_dict() | {"width": width, "width_divisor": _divisor(config.segments)}))
        return sum(p.numel() for p in build_model(candidate, data).parameters()), candidate

    try:
        low, high = 1 / 32, 16.0
        params(1.0)
    except SegmentError:
        raise
    except ValueError as err:
        raise ValueError(f"--match-params needs a model with a width knob (continuum_small): {err}") from None
    for _ in range(40):  # bisection on the (step-wise increasing) parameter count
        middle = math.sqrt(low * high)
        if params(middle)[0] < target:
            low = middle
        else:
            high = middle
    best_count, best = min((params(w) for w in (low, high)), key=lambda pair: abs(pair[0] - target))
    if abs(best_count - target) > MATCH_TOLERANCE * target:
        raise ValueError(f"--match-params {target}: segments={config.segments} gets no closer than {best_count:,} "
                         f"parameters (width {best.width:.3f}); choose another target or allow other segment counts")
    return best


# ------------------------------------------------------------------------------------------------------------ storage

def storage_url(cfg: SweepConfig) -> str:
    """The study's storage URL: ``--storage``, else a file in the study's results folder (see
    :func:`continuum.storage.default_storage`)."""
    return cfg.storage or default_storage(Path(cfg.out) / cfg.study, cfg.workers)


def _sampler(cfg: SweepConfig) -> optuna.samplers.BaseSampler:
    seed = cfg.seeds[0]
    if cfg.search == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if cfg.search == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # grid trials are all enqueued; it never draws


def _pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.train.epochs)
    return optuna.pruners.NopPruner()


def _settings_diff(stored: dict, current: dict) -> list[str]:
    diff = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [f"{key}.{d}" for d in _settings_diff(a, b)]
        elif json.dumps(a, default=str) != json.dumps(b, default=str):
            diff.append(f"{key} ({a!r} there, {b!r} now)")
    return diff


def open_study(cfg: SweepConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the study, or load it and check it was run with the same fixed settings.

    Raises:
        ValueError: the existing study's settings differ (nothing is written to it).
    """
    settings = cfg.fixed_settings()
    directions = [OBJECTIVES[o] for o in cfg.objectives]
    existing = {s.study_name: s for s in storage.get_all_studies()}
    if cfg.study in existing:
        stored = existing[cfg.study].user_attrs.get("settings")
        diff = _settings_diff(stored, settings) if stored is not None else []
        if diff:
            raise ValueError(f"study {cfg.study!r} was run with other settings: {'; '.join(diff)}; "
                             "use --study NEW or the same settings")
    study = optuna.create_study(storage=storage, study_name=cfg.study, directions=directions,
                                sampler=_sampler(cfg), pruner=_pruner(cfg), load_if_exists=True)
    if "settings" not in study.user_attrs:
        study.set_user_attr("settings", settings)
    return study


# ---------------------------------------------------------------------------------------------------------- objective

def point_key(config: ModelConfig, seed: int) -> str:
    """The canonical text of a grid point x seed: how a rerun recognises work already done."""
    return json.dumps(config.to_dict() | {"seed": seed}, sort_keys=True, default=list)


def grid_points(cfg: SweepConfig) -> list[tuple[ModelConfig, int]]:
    """Every model x segments x order x mid_act x residual x width x seed of a grid sweep, in run order."""
    return [(ModelConfig(m, s, o, a, r, w, None, cfg.drop_rate).validate(), seed)
            for m in cfg.models for w in cfg.widths for r in cfg.residuals for a in cfg.mid_acts
            for o in cfg.orders for s in cfg.segments for seed in cfg.seeds]


def suggest_point(trial: optuna.Trial, cfg: SweepConfig) -> tuple[ModelConfig, int]:
    """The search space of ``--search``: per-part segments, order, activation and residual, and the width.

    Choices come from the command only, never from the model, so every trial shares one search space. The seed
    is not searched: trial ``n`` trains with ``seeds[n % len(seeds)]``.
    """
    def per_part(name: str, choices: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(trial.suggest_categorical(f"{name}_{i + 1}", list(choices)) for i in range(STAGES))

    config = ModelConfig(
        model=trial.suggest_categorical("model", list(cfg.models)),
        segments=per_part("segments", cfg.segments), order=per_part("order", cfg.orders),
        mid_act=per_part("mid_act", cfg.mid_acts), residual=per_part("residual", cfg.residuals),
        width=trial.suggest_categorical("width", list(cfg.widths)), drop_rate=cfg.drop_rate).validate()
    return config, cfg.seeds[trial.number % len(cfg.seeds)]  # seeds cycle; not a parameter the sampler tunes


def grid_point(trial: optuna.Trial, retry_failed: bool = False) -> tuple[ModelConfig, int]:
    """The enqueued point of a grid trial (its ``point`` user attribute).

    Workers enqueueing at the same time may queue a point twice; the trial then stands down (fails as a
    duplicate, training nothing) unless it is the lowest-numbered live trial of its point, so each point runs once.

    Grid values are not Optuna params: a study's categorical choices are fixed once stored, and a grid may grow
    (a rerun with more segment counts adds points to the same study).
    """
    if "point" not in trial.user_attrs:
        trial.set_user_attr("fail_reason", "no grid point left (another worker took the last one)")
        raise TrialFailed("no grid point left")
    key = trial.user_attrs["point"]
    others = [t for t in trial.study.get_trials(deepcopy=False)
              if t.user_attrs.get("point") == key and t.number != trial.number]
    taken = point_taken(others, before=trial.number, retry_failed=retry_failed)
    if taken is not None:
        trial.set_user_attr("fail_reason", f"{DUPLICATE}: trial {taken} has this point")
        raise TrialFailed(DUPLICATE)
    point = json.loads(key)
    seed = point.pop("seed")
    return ModelConfig.from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in point.items()}), seed


def _git_commit() -> str | None:
    root = Path(continuum.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", "continuum"]).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


class Objective:
    """Trains one point per trial and records everything about it on the trial.

    Args:
        cfg: the sweep.
        data: the dataset, loaded once for all trials.
        progress: show a tqdm bar per trial.
    """

    def __init__(self, cfg: SweepConfig, data: TensorData, progress: bool) -> None:
        self.cfg = cfg
        self.data = data
        self.progress = progress
        self.device = resolve_device(cfg.train.device)
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.context = {
            "dataset": cfg.data.dataset, "train_size": len(data.train_y), "val_size": len(data.val_y),
            "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size, "recipe": cfg.train.recipe,
            "lr": cfg.train.resolved_lr, "weight_decay": cfg.train.resolved_weight_decay,
            "latency_batch": cfg.latency_batch,
            "device": f"{device_name} ({torch.get_num_threads()} threads)" if device_name == "cpu" else device_name,
            "torch": torch.__version__, "git": _git_commit(), "worker": worker_id(),
        }

    def configure(self, trial: optuna.Trial) -> tuple[ModelConfig, int]:
        """The trial's point, width-matched when ``match_params`` is set."""
        if self.cfg.search == "grid":
            config, seed = grid_point(trial, self.cfg.retry_failed)
        else:
            config, seed = suggest_point(trial, self.cfg)
        if self.cfg.match_params:
            config = match_width(config, self.cfg.match_params, self.data)
        return config, seed

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        start = time.perf_counter()
        for key, value in trial.user_attrs.items():  # a retried trial inherits its stale original's records
            if key != "point" and value is not None:
                trial.set_user_attr(key, None)
        config, seed = self.configure(trial)
        trial.set_user_attr("config", config.to_dict() | {"seed": seed})
        for key, value in self.context.items():
            trial.set_user_attr(key, value)
        curve: list[dict] = []

        def on_epoch(metrics: dict) -> None:
            curve.append(metrics)
            trial.set_user_attr("curve", curve)
            self._record(trial, curve, start)
            if len(self.cfg.objectives) == 1:
                trial.report(metrics["val_acc"], metrics["epoch"])
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {metrics['epoch']}")

        try:
            torch.manual_seed(seed)
            model = build_model(config, self.data)
            cost = model_cost(model, self.data.input_size)
            latency = measure_latency(model, self.data.input_size, self.cfg.latency_batch, self.device, 2, 5)
            costs = {"params": cost.params, "macs": cost.macs, "flops": cost.flops, "latency_ms": latency.median_ms}
            for key, value in costs.items():
                trial.set_user_attr(key, value)
            fit(model, self.data, self.cfg.train, seed, on_epoch, self.progress, f"trial {trial.number}")
        except (TrainingFailed, SegmentError) as err:
            self._fail(trial, str(err))
        except torch.cuda.OutOfMemoryError:
            self._fail(trial, f"CUDA out of memory at batch size {self.cfg.train.batch_size}; lower --batch-size")
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", INTERRUPTED)
            raise
        values = {"val_acc": curve[-1]["val_acc"], "flops": costs["flops"], "latency": costs["latency_ms"],
                  "params": costs["params"]}
        result = tuple(values[o] for o in self.cfg.objectives)
        return result[0] if len(result) == 1 else result

    @staticmethod
    def _record(trial: optuna.Trial, curve: list[dict], start: float) -> None:
        last = curve[-1]
        trial.set_user_attr("val_acc", last["val_acc"])
        trial.set_user_attr("val_loss", last["val_loss"])
        trial.set_user_attr("best_val_acc", max(m["val_acc"] for m in curve))
        trial.set_user_attr("best_val_loss", min(m["val_loss"] for m in curve))
        trial.set_user_attr("epochs_done", len(curve))
        trial.set_user_attr("train_s", sum(m["seconds"] for m in curve))
        trial.set_user_attr("images_per_s", sum(m["images_per_s"] for m in curve) / len(curve))
        trial.set_user_attr("wall_s", time.perf_counter() - start)

    @staticmethod
    def _fail(trial: optuna.Trial, reason: str) -> None:
        log.warning("trial %d failed: %s", trial.number, reason)
        trial.set_user_attr("fail_reason", reason)
        raise TrialFailed(reason)


# -------------------------------------------------------------------------------------------------------------- runs

def export(study: optuna.Study, folder: Path) -> None:
    """Write the study's trials.csv, curves.csv and summary.md (each atomically)."""
    trials, curves = study_frames(study)
    write_tables(trials, curves, folder)
    write_summary(folder, trials)


def point_taken(trials: Sequence[optuna.trial.FrozenTrial], before: int | None = None,
                retry_failed: bool = False) -> int | None:
    """The number of a trial that has done or holds a grid point, among ``trials`` of that point, else ``None``.

    Done: COMPLETE or PRUNED, or FAIL for a lasting reason (non-finite loss, out of memory) unless ``retry_failed``.
    Held: WAITING or RUNNING (numbered below ``before`` when given). Trials stopped by Ctrl-C, by a dead worker or
    standing down as duplicates neither do nor hold their point.
    """
    for t in sorted(trials, key=lambda t: t.number):
        reason = t.user_attrs.get("fail_reason") or ""
        lasting_failure = t.state == TrialState.FAIL and reason and not reason.startswith(TRANSIENT_FAILURES)
        live = t.state in (TrialState.WAITING, TrialState.RUNNING) and (before is None or t.number < before)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or live or (lasting_failure and not retry_failed):
            return t.number
    return None


def plan_grid(study: optuna.Study, keys: Sequence[str], retry_failed: bool) -> int:
    """Enqueue every grid point x seed that no trial has done or holds (:func:`point_taken`); returns how many."""
    seen: dict[str, list] = defaultdict(list)
    for trial in study.get_trials(deepcopy=False):
        if "point" in trial.user_attrs:
            seen[trial.user_attrs["point"]].append(trial)
    missing = [key for key in keys if point_taken(seen[key], retry_failed=retry_failed) is None]
    for key in missing:
        study.enqueue_trial({}, user_attrs={"point": key})
    return len(missing)


def worker_id() -> str:
    """``host:pid`` of this process, recorded on its trials."""
    return f"{socket.gethostname()}:{os.getpid()}"


def count_trials(study: optuna.Study, states: Sequence[TrialState], keys: set[str] | None = None) -> int:
    """Trials of ``study`` in ``states``; with ``keys``, only those of these grid points."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=tuple(states))
               if keys is None or t.user_attrs.get("point") in keys)


def connect(cfg: SweepConfig) -> optuna.Study:
    """Open (or create) the study of ``cfg`` in its storage, making the results folder when the storage is a file."""
    folder = Path(cfg.out) / cfg.study
    url = storage_url(cfg)
    if url.startswith(("sqlite:///", "journal:")):
        folder.mkdir(parents=True, exist_ok=True)
    if cfg.storage is None and url.startswith("journal:"):
        move_sqlite_study_to_journal(folder, cfg.study)
    study = open_study(cfg, open_storage(url, cfg.heartbeat))
    folder.mkdir(parents=True, exist_ok=True)
    return study


def run(cfg: SweepConfig, data: TensorData, progress: bool = True, command: str | None = None,
        report: bool = True) -> optuna.Study:
    """Run (or resume) the sweep ``cfg`` on ``data`` and write its results tables and plots.

    Args:
        cfg: the validated sweep.
        data: the dataset (already subset as ``cfg.data`` asks).
        progress: tqdm bars for the sweep and each trial.
        command: the command line, recorded in ``command.txt`` beside the tables.
        report: draw the plots at the end (the tables and summary are written after every trial regardless).
    """
    folder = Path(cfg.out) / cfg.study
    study = connect(cfg)
    if command:
        with open(folder / "command.txt", "a") as handle:
            handle.write(command + "\n")
    objective = Objective(cfg, data, progress)
    ordered = [point_key(c, s) for c, s in grid_points(cfg)] if cfg.search == "grid" else []
    keys = set(ordered)
    if cfg.search == "grid":
        plan_grid(study, ordered, cfg.retry_failed)
        todo = count_trials(study, (TrialState.WAITING, TrialState.RUNNING), keys)
    else:
        todo = max(0, cfg.n_trials - count_trials(study, (TrialState.COMPLETE, TrialState.PRUNED)))
    bar = tqdm(total=todo, desc=f"sweep {cfg.study}", unit="trial", disable=not progress)
    callbacks = [lambda s, t: export(s, folder), lambda s, t: bar.update()]
    try:
        while True:
            if cfg.search != "grid":
                if count_trials(study, (TrialState.COMPLETE, TrialState.PRUNED)) >= cfg.n_trials:
                    break
            else:
                plan_grid(study, ordered, cfg.retry_failed)  # re-queues points whose worker died meanwhile
                if not count_trials(study, (TrialState.WAITING,)):
                    if not count_trials(study, (TrialState.RUNNING,), keys):
                        break
                    optuna.storages.fail_stale_trials(study)  # a dead worker's trial is failed and re-queued
                    time.sleep(min(cfg.heartbeat, 2))
                    continue
            try:
                study.optimize(objective, n_trials=1, catch=(TrialFailed,), callbacks=callbacks)
            except optuna.exceptions.UpdateFinishedTrialError as err:
                # our heartbeat lapsed (database down too long), so another worker failed and reran this trial
                log.warning("a trial was taken over by another worker; going on (%s)", err)
    finally:
        bar.close()
        export(study, folder)
    if report:
        write_report(folder)
    return study


# ----------------------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    """The command line; every default is ``None`` so an experiment file's values are not overridden."""
    parser = argparse.ArgumentParser(prog="python -m continuum.sweep", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    axes = parser.add_argument_group("axes (comma lists)")
    axes.add_argument("--segments", help="segment counts: ints and/or all (default: 1,4,16,all)")
    axes.add_argument("--order", help="depthwise_first and/or pointwise_first (default: depthwise_first)")
    axes.add_argument("--mid-act", help="none, relu, elu, gelu, silu, leaky_relu, tanh (default: none)")
    axes.add_argument("--residual", help="on and/or off (default: on)")
    axes.add_argument("--seeds", help="seeds; every point runs once per seed (default: 0)")
    axes.add_argument("--model", help="timm model names (default: continuum_small)")
    axes.add_argument("--width", help="width multipliers (default: 1.0)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help="fashion-mnist, cifar10, cifar100, imagefolder:PATH, synthetic")
    data.add_argument("--data-dir", help="where the dataset is (default: $CONTINUUM_DATA, Debian's, cache)")
    data.add_argument("--train-size", help="training images used, 0 = all (default: 10000)")
    data.add_argument("--val-size", help="validation images used, 0 = all (default: 2000)")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", help="epochs per trial (default: 3)")
    train.add_argument("--batch-size", help="images per step (default: 128)")
    train.add_argument("--lr", help="initial learning rate (default: the recipe's)")
    train.add_argument("--recipe", help="cosine, paper_sgd (0.045 x0.94 per 2 epochs, scaled), paper_rmsprop")
    train.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: auto)")
    train.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    sweep = parser.add_argument_group("study")
    sweep.add_argument("--config", type=Path, help="experiment file (TOML) with these settings")
    sweep.add_argument("--study", help="study name (default: default)")
    sweep.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUT/STUDY/study.db)")
    sweep.add_argument("--out", help="results root; tables go to OUT/STUDY/ (default: results)")
    sweep.add_argument("--match-params", help="scale each point's width to N parameters (within 2 %%)")
    sweep.add_argument("--search", choices=["grid", "tpe", "nsga2"], help="grid (default) or a search")
    sweep.add_argument("--n-trials", help="trials of a search (default: 20)")
    sweep.add_argument("--objectives", help="val_acc[,flops|latency|params] (default: val_acc; nsga2: +flops)")
    sweep.add_argument("--pruner", choices=["none", "median", "hyperband"], help="prune weak trials early")
    sweep.add_argument("--retry-failed", action="store_const", const=True, help="rerun points that failed")
    sweep.add_argument("--heartbeat", help="seconds between trial heartbeats (default: 10)")
    sweep.add_argument("--workers", help="local worker processes sharing the study (default: 1); one GPU each "
                                         "when several are visible, else the CPU threads split between them")
    sweep.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    sweep.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a process of --workers N
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    settings = {k: v for k, v in vars(args).items() if k not in ("config", "quiet", "worker")}
    try:
        file_settings = read_experiment(args.config) if args.config else {}
        cfg = build_config(file_settings | {k: v for k, v in settings.items() if v is not None})
        resolve_device(cfg.train.device)
        data = load_dataset(cfg.data.dataset, cfg.data.data_dir).subset(cfg.data.train_size, cfg.data.val_size)
        if cfg.search == "grid":
            for config, _ in grid_points(cfg):  # every point must build before anything is written
                match_width(config, cfg.match_params, data) if cfg.match_params else build_model(config, data)
        command = "python -m continuum.sweep " + shlex.join(argv)
        if args.worker:  # the parent records the command, writes the report and prints the table
            run(cfg, data, progress=False, report=False)
            return 0
        if cfg.workers > 1:
            from continuum.workers import run_workers

            run_workers(cfg, argv, data, progress=not args.quiet, command=command)
        else:
            run(cfg, data, progress=not args.quiet, command=command)
    except (ValueError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the study is consistent; rerun the same command to resume", file=sys.stderr)
        return 130
    folder = Path(cfg.out) / cfg.study
    print((folder / "summary.md").read_text())
    print(f"results: {folder}/ (trials.csv, curves.csv, summary.md, plots); study {cfg.study!r} in {storage_url(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
