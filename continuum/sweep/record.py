"""What a study records about each trial: :class:`TrialRecord`, whose fields ARE the columns of ``trials.csv``, and
the rows of ``trials.csv`` and ``curves.csv`` read back from a study.

A trial stores one Optuna user attribute per column it measures (so a study written by an older version still
reads), plus ``config`` (the point), ``curve`` (the epochs) and, in a grid, ``point`` (its key).
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Iterable

import numpy as np
import optuna
import pandas as pd

from continuum.config import ModelConfig
from continuum.train import EpochMetrics

STALE = "worker stopped (no heartbeat); its point was rerun"
"""``fail_reason`` shown for a trial whose process died (SIGKILL, power loss) and whose heartbeat went stale."""


@dataclass
class TrialId:
    """Which trial.

    Args:
        trial: the trial's number in its study.
        state: ``COMPLETE``, ``FAIL``, ``PRUNED`` or ``RUNNING``.
    """

    trial: int
    state: str


TrialPoint = dataclasses.make_dataclass(
    "TrialPoint", [(f.name, Any, None) for f in fields(ModelConfig)] + [("lr", Any, None), ("seed", Any, None)])
"""The point of the continuum a trial trained: :class:`~continuum.config.ModelConfig`'s fields, the initial learning
rate in force (a sweep's ``lr`` axis, or the recipe's) and the seed (a list-valued knob is shown per stage, joined
by ``/``)."""


@dataclass
class TrialMetrics:
    """What a trial measured.

    Args:
        val_acc: validation accuracy after the last epoch.
        val_loss: validation loss after the last epoch.
        best_val_acc: best validation accuracy over the epochs.
        best_val_loss: lowest validation loss over the epochs.
        params: parameters.
        macs: multiply-accumulates of one image's forward pass.
        flops: FLOPs of one image's forward pass (2 per MAC, plus norms and activations).
        latency_ms: median forward time of a batch of ``latency_batch`` images, measured after training.
        latency_load: share of the machine's CPU time other processes used while latency was measured; above
            :data:`~continuum.cost.CONTENDED_LOAD` the latency is contended and marked so in the summary.
        epochs_done: epochs finished.
        train_s: training and validation seconds.
        wall_s: the trial's seconds, from start to its last record.
        images_per_s: mean training images per second.
        test_acc: test accuracy after training (``holdout`` studies; the test split touched once).
        test_loss: test loss after training.
        test_correct: which test images the trained model got right, in the test split's order:
            :func:`encode_correct`'s text (``decode_correct`` reads it back), for paired tests between trials.
    """

    val_acc: float | None = None
    val_loss: float | None = None
    best_val_acc: float | None = None
    best_val_loss: float | None = None
    params: int | None = None
    macs: int | None = None
    flops: int | None = None
    latency_ms: float | None = None
    latency_load: float | None = None
    epochs_done: int | None = None
    train_s: float | None = None
    wall_s: float | None = None
    images_per_s: float | None = None
    test_acc: float | None = None
    test_loss: float | None = None
    test_correct: str | None = None


TEXT_METRICS = ("test_correct",)
"""Measurements held as text, not numbers."""


def encode_correct(correct: Any) -> str:
    """Per-image correctness (a bool sequence) as compact text: the bits packed (NumPy's ``packbits``, first image
    in the highest bit) and base64-encoded; 10,000 images take 1,668 characters."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode("ascii")


def decode_correct(text: str, images: int) -> np.ndarray:
    """The bool array of ``images`` entries that :func:`encode_correct` wrote.

    Raises:
        ValueError: the text is not such an encoding of ``images`` entries.
    """
    try:
        packed = np.frombuffer(base64.b64decode(text, validate=True), dtype=np.uint8)
    except (ValueError, TypeError) as err:
        raise ValueError(f"per-image correctness is not valid base64 ({err})") from None
    if len(packed) != (images + 7) // 8:
        raise ValueError(f"per-image correctness holds {len(packed) * 8} bits, not {images} images' worth")
    return np.unpackbits(packed)[:images].astype(bool)


@dataclass
class TrialRun:
    """How and where a trial ran.

    Args:
        dataset: the dataset's name.
        train_size: training images.
        val_size: validation images.
        test_size: test images (scored once, after training), in a ``holdout`` study.
        epochs: epochs asked for.
        batch_size: images per step.
        recipe: training recipe.
        warmup_epochs: epochs of linear learning-rate warm-up.
        weight_decay: weight decay in force.
        precision: the precision it trained in, ``fp32`` or ``bf16`` (``auto`` resolved on its device).
        channels_last: whether the model and its batches were channels-last.
        compile: whether the model ran through ``torch.compile``.
        latency_batch: batch size of the latency probe.
        device: the device (CPU model and threads, or GPU name).
        threads: torch's intra-op CPU threads.
        python: Python's version.
        torch: torch's version.
        timm: timm's version.
        optuna: Optuna's version.
        cuda: the CUDA version torch runs with, on a GPU.
        cudnn: cuDNN's version, on a GPU.
        conv_strategies: the kernels the segmented convs ran with
            (:func:`~continuum.strategy.strategies_fingerprint`).
        resumed_epochs: epochs taken from the training state an interrupted earlier trial of the point saved
            (their metrics as measured then).
        git: the commit of the code (``-dirty`` with local changes).
        worker: ``host:pid`` of the process that ran it.
        fail_reason: why it failed or stood down.
        started: when it started (ISO, seconds).
        completed: when it ended.
    """

    dataset: str | None = None
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    recipe: str | None = None
    warmup_epochs: float | None = None
    weight_decay: float | None = None
    precision: str | None = None
    channels_last: bool | None = None
    compile: bool | None = None
    latency_batch: int | None = None
    device: str | None = None
    threads: int | None = None
    python: str | None = None
    torch: str | None = None
    timm: str | None = None
    optuna: str | None = None
    cuda: str | None = None
    cudnn: str | None = None
    conv_strategies: str | None = None
    resumed_epochs: int | None = None
    git: str | None = None
    worker: str | None = None
    fail_reason: str | None = None
    started: str | None = None
    completed: str | None = None


@dataclass
class TrialRecord(TrialRun, TrialMetrics, TrialPoint, TrialId):
    """One row of ``trials.csv``: :class:`TrialId`, :class:`TrialPoint`, :class:`TrialMetrics` and
    :class:`TrialRun`, in that order."""


def names(record_class: type) -> list[str]:
    """The field names of a record dataclass, in order."""
    return [f.name for f in fields(record_class)]


POINT_COLUMNS = names(TrialPoint)
"""The point columns (also the leading columns of ``curves.csv``)."""

TRIAL_COLUMNS = names(TrialRecord)
"""The columns of ``trials.csv``."""

CURVE_COLUMNS = ["trial", *POINT_COLUMNS, *names(EpochMetrics)]
"""The columns of ``curves.csv``."""

RECORDED = set(names(TrialMetrics)) | set(names(TrialRun)) | {"lr"}
"""What an objective may record on a trial, one user attribute each (:func:`record`); the learning rate in force
is recorded too (trials of older studies have it there only, not in their ``config``)."""


def record(trial: optuna.Trial, **values: Any) -> None:
    """Store columns of the trial's :class:`TrialRecord` on it, one user attribute each.

    Raises:
        KeyError: a name that is not a recorded column (so that nothing is recorded and silently dropped).
    """
    unknown = sorted(set(values) - RECORDED)
    if unknown:
        raise KeyError(f"not columns of TrialRecord: {unknown}")
    for key, value in values.items():
        trial.set_user_attr(key, value)


def format_knob(value: Any) -> Any:
    """A knob as a table cell: ``None`` -> ``"none"``, per-stage lists joined by ``/``."""
    if isinstance(value, (list, tuple)):
        return "/".join(str(format_knob(v)) for v in value)
    return "none" if value is None else value


def point_cells(config: dict[str, Any]) -> dict[str, Any]:
    """The point columns of a trial's ``config`` attribute (segments always as text, the learning rate a number)."""
    cells = {key: format_knob(config.get(key)) for key in POINT_COLUMNS}
    cells["segments"] = str(cells["segments"])
    cells["lr"] = config.get("lr")
    return cells


def trial_point(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The point columns of a trial (its learning rate from its records where its ``config`` predates it)."""
    attrs = trial.user_attrs
    return point_cells({"lr": attrs.get("lr"), **attrs["config"]})


def trial_record(trial: optuna.trial.FrozenTrial) -> TrialRecord | None:
    """The record of one trial, or ``None`` for a trial that trained nothing (no ``config`` recorded)."""
    attrs = trial.user_attrs
    if attrs.get("config") is None or trial.state == optuna.trial.TrialState.WAITING:
        return None
    row = TrialRecord(trial.number, trial.state.name, **trial_point(trial),
                      **{key: attrs.get(key) for key in RECORDED - {"lr"}})
    row.started = trial.datetime_start.isoformat(timespec="seconds") if trial.datetime_start else None
    row.completed = trial.datetime_complete.isoformat(timespec="seconds") if trial.datetime_complete else None
    if trial.state == optuna.trial.TrialState.FAIL and not row.fail_reason:
        row.fail_reason = STALE
    return row


OLD_EPOCH_NAMES = {"lr": "epoch_lr"}
"""Epoch metrics under their former names (in older trials and ``curves.csv`` tables), and their names now."""


def curve_rows(trial: optuna.trial.FrozenTrial) -> list[dict[str, Any]]:
    """One row per finished epoch of a trial that has a :func:`trial_record`."""
    point = trial_point(trial)
    epochs = [{OLD_EPOCH_NAMES.get(k, k): v for k, v in epoch.items()} for epoch in trial.user_attrs.get("curve") or []]
    return [{"trial": trial.number, **point, **{k: epoch.get(k) for k in names(EpochMetrics)}} for epoch in epochs]


TrialRows = tuple[dict[str, Any], list[dict[str, Any]]]
"""A trial's row of ``trials.csv`` and its rows of ``curves.csv``."""


def trial_rows(trial: optuna.trial.FrozenTrial) -> TrialRows | None:
    """A trial's rows in the results tables, or ``None`` for a trial that trained nothing."""
    row = trial_record(trial)
    return None if row is None else (dataclasses.asdict(row), curve_rows(trial))


def frames(rows: Iterable[TrialRows]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(trials, curves)`` DataFrames with :data:`TRIAL_COLUMNS` and :data:`CURVE_COLUMNS`, in trial order, from
    each trial's :func:`trial_rows`."""
    rows = sorted(rows, key=lambda pair: pair[0]["trial"])
    return (pd.DataFrame([row for row, _ in rows], columns=TRIAL_COLUMNS),
            pd.DataFrame([epoch for _, curve in rows for epoch in curve], columns=CURVE_COLUMNS))


def study_frames(study: optuna.Study) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(trials, curves)`` DataFrames of a study, with :data:`TRIAL_COLUMNS` and :data:`CURVE_COLUMNS`."""
    return frames(rows for rows in map(trial_rows, study.get_trials(deepcopy=False)) if rows is not None)
