"""A study or a results folder -> one tidy pandas DataFrame, one row per trial, plain column names.

Tables written next to a study (``DIR/<study>/``): ``trials.csv`` (+ ``trials.parquet`` with pyarrow),
``curves.csv`` (one row per trial and epoch). Files are written under a temporary name and renamed, so a reader
(or a crash) never sees half a table.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import optuna
import pandas as pd

CONFIG_COLUMNS = ["model", "segments", "order", "mid_act", "residual", "width", "width_divisor", "drop_rate", "seed"]
"""The point of the continuum a trial trained (a list-valued knob is shown per stage, joined by ``/``)."""

METRIC_COLUMNS = ["val_acc", "val_loss", "best_val_acc", "best_val_loss", "params", "macs", "flops", "latency_ms",
                  "epochs_done", "train_s", "wall_s", "images_per_s"]
RUN_COLUMNS = ["dataset", "train_size", "val_size", "epochs", "batch_size", "recipe", "lr", "weight_decay",
               "latency_batch", "device",
               "torch", "git", "fail_reason", "started", "completed"]
TRIAL_COLUMNS = ["trial", "state", *CONFIG_COLUMNS, *METRIC_COLUMNS, *RUN_COLUMNS]
STALE = "worker stopped (no heartbeat); its point was rerun"
"""``fail_reason`` shown for a trial whose process died (SIGKILL, power loss) and whose heartbeat went stale."""

CURVE_METRICS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]
CURVE_COLUMNS = ["trial", *CONFIG_COLUMNS, *CURVE_METRICS]


def format_knob(value: Any) -> Any:
    """A knob as a table cell: ``None`` -> ``"none"``, per-stage lists joined by ``/``, ints as text for segments."""
    if isinstance(value, (list, tuple)):
        return "/".join(str(format_knob(v)) for v in value)
    return "none" if value is None else value


def _config_cells(config: dict[str, Any]) -> dict[str, Any]:
    cells = {key: format_knob(config.get(key)) for key in CONFIG_COLUMNS}
    cells["segments"] = str(cells["segments"])
    return cells


def trial_row(trial: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    """The row of one trial, or ``None`` for a trial that trained nothing (no ``config`` recorded)."""
    attrs = trial.user_attrs
    if attrs.get("config") is None or trial.state == optuna.trial.TrialState.WAITING:
        return None
    row = {"trial": trial.number, "state": trial.state.name, **_config_cells(attrs["config"])}
    row |= {key: attrs.get(key) for key in METRIC_COLUMNS + RUN_COLUMNS}
    row["started"] = trial.datetime_start.isoformat(timespec="seconds") if trial.datetime_start else None
    row["completed"] = trial.datetime_complete.isoformat(timespec="seconds") if trial.datetime_complete else None
    if trial.state == optuna.trial.TrialState.FAIL and not row["fail_reason"]:
        row["fail_reason"] = STALE
    return row


def curve_rows(trial: optuna.trial.FrozenTrial) -> list[dict[str, Any]]:
    """One row per finished epoch of a trial that has a :func:`trial_row`."""
    config = _config_cells(trial.user_attrs["config"])
    return [{"trial": trial.number, **config, **{k: epoch.get(k) for k in CURVE_METRICS}}
            for epoch in trial.user_attrs.get("curve") or []]


def study_frames(study: optuna.Study) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(trials, curves)`` DataFrames of a study."""
    rows, curves = [], []
    for trial in study.get_trials(deepcopy=False):
        row = trial_row(trial)
        if row is not None:
            rows.append(row)
            curves += curve_rows(trial)
    return (pd.DataFrame(rows, columns=TRIAL_COLUMNS).sort_values("trial", ignore_index=True),
            pd.DataFrame(curves, columns=CURVE_COLUMNS).sort_values(["trial", "epoch"], ignore_index=True))


def normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Give a table read from CSV the types of a fresh one: segments, order and mid_act as text."""
    frame = frame.copy()
    for column in ("segments", "order", "mid_act", "model", "state"):
        if column in frame:
            frame[column] = frame[column].astype("string").fillna("none" if column == "mid_act" else pd.NA)
    return frame


def load(source: str | Path | optuna.Study, study_name: str | None = None, curves: bool = False) -> pd.DataFrame:
    """One row per trial (or per trial and epoch with ``curves=True``), plain column names.

    Args:
        source: an ``optuna.Study``; a results folder (``DIR/<study>`` holding ``trials.csv``) or a CSV/Parquet
            file; or a storage URL (``sqlite:///...``, ``postgresql://...``) with ``study_name``.
        study_name: the study to read from a storage URL.
        curves: return the per-epoch table instead.

    Raises:
        FileNotFoundError: no tables at that path.
        ValueError: a storage URL without ``study_name``.
    """
    if isinstance(source, optuna.Study):
        return study_frames(source)[1 if curves else 0]
    text = str(source)
    if "://" in text:
        if study_name is None:
            raise ValueError("reading a storage URL needs study_name=")
        return load(optuna.load_study(study_name=study_name, storage=text), curves=curves)
    path = Path(text)
    if path.is_dir():
        name = "curves" if curves else "trials"
        parquet, csv = path / f"{name}.parquet", path / f"{name}.csv"
        path = parquet if parquet.exists() and _has_parquet() else csv
    if not path.exists():
        raise FileNotFoundError(f"no results table at {path}; run python -m continuum.sweep first")
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    return normalise(frame)


def _has_parquet() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file under a temporary name in its folder, then rename it into place.

    Args:
        path: the final file.
        write: writes the content to the temporary path it is given.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tables(trials: pd.DataFrame, curves: pd.DataFrame, folder: Path) -> None:
    """Write ``trials.csv`` (+ ``.parquet`` with pyarrow) and ``curves.csv`` atomically into ``folder``."""
    atomic_write(folder / "trials.csv", lambda p: trials.to_csv(p, index=False))
    atomic_write(folder / "curves.csv", lambda p: curves.to_csv(p, index=False))
    if _has_parquet():
        atomic_write(folder / "trials.parquet", lambda p: trials.to_parquet(p, index=False))

