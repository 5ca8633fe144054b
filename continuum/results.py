"""A study or a results folder -> one tidy pandas DataFrame, one row per trial, plain column names.

Tables written next to a study (``DIR/<study>/``, by :class:`continuum.sweep.tables.StudyTables`): ``trials.csv``
(+ ``trials.parquet``, a typed copy for other tools), ``curves.csv`` (one row per trial and epoch);
their columns are :data:`~continuum.sweep.record.TRIAL_COLUMNS` and :data:`~continuum.sweep.record.CURVE_COLUMNS`.
A folder is always read from its CSV tables, the complete record (never from a Parquet copy that may be stale), and
every table read from a file is checked: a garbled, empty, truncated or foreign table is a :class:`TableError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
from optuna.storages import JournalStorage
from optuna.trial import TrialState

from continuum.checkpoint import load_checkpoint
from continuum.sweep.points import KEYED_WHEN_SET
from continuum.sweep.storage import journal_backend, storage_file
from continuum.sweep.record import CURVE_COLUMNS, POINT_COLUMNS, TRIAL_COLUMNS, EpochMetrics, OLD_EPOCH_NAMES, \
    TEXT_METRICS, TrialId, TrialMetrics, format_knob, names, study_frames

LATER_KNOBS = {name: format_knob(default) for name, default in KEYED_WHEN_SET.items() if name != "lr"}
"""Point columns added after tables had been written: a table without them reads them as these defaults (what its
trials ran with)."""

KEY_COLUMNS = {kind: [c for c in columns if c not in LATER_KNOBS and c != "lr"] for kind, columns in
               {"trials": [*names(TrialId), *POINT_COLUMNS], "curves": ["trial", *POINT_COLUMNS, "epoch"]}.items()}
"""Columns a table must have to be read: what identifies each row (others, added by later versions, may be
missing from older tables and read as empty, or as :data:`LATER_KNOBS`; older curves tables have no ``lr``)."""

NUMERIC_COLUMNS = ["trial", "epoch", "seed", "width", "drop_rate", "lr",
                   *(c for c in names(TrialMetrics) if c not in TEXT_METRICS), *names(EpochMetrics)]
"""Columns whose cells must be numbers (or empty)."""


class TableError(ValueError):
    """A results table that cannot be read as one: the message names the file and what is wrong."""


def normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Give a table read from CSV the types of a fresh one: segments, order and mid_act as text."""
    frame = frame.copy()
    for column in ("segments", "order", "mid_act", "model", "state"):
        if column in frame:
            frame[column] = frame[column].astype("string").fillna("none" if column == "mid_act" else pd.NA)
    return frame


def read_table(path: Path, kind: str) -> pd.DataFrame:
    """A trials or curves table from a CSV or Parquet file, checked.

    Args:
        path: the file.
        kind: ``"trials"`` or ``"curves"``.

    Raises:
        TableError: the file is empty, cut off mid-row, not a table, lacks the key columns, or holds
            non-numbers in numeric columns, unknown trial states or missing trial numbers.
    """
    if path.suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError, ImportError) as err:
            raise TableError(f"{path} is not a readable Parquet table ({type(err).__name__})") from None
    else:
        content = path.read_bytes()
        if not content.strip():
            raise TableError(f"{path} is empty; rerun the sweep to write it")
        if not content.endswith(b"\n"):
            raise TableError(f"{path} is cut off mid-row (truncated); rerun the sweep to write it whole")
        try:
            frame = pd.read_csv(path)
        except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise TableError(f"{path} is not a CSV table ({type(err).__name__})") from None
    if kind == "curves" and not set(OLD_EPOCH_NAMES.values()) & set(frame):
        frame = frame.rename(columns=OLD_EPOCH_NAMES)  # a table from before the renaming
    missing = [column for column in KEY_COLUMNS[kind] if column not in frame]
    if missing:
        raise TableError(f"{path} lacks the columns {missing}: not a continuum {kind} table")
    for column in [c for c in NUMERIC_COLUMNS if c in frame]:
        numbers = pd.to_numeric(frame[column], errors="coerce")
        if (numbers.isna() & frame[column].notna()).any():
            raise TableError(f"{path}: column {column} holds values that are not numbers")
        frame[column] = numbers
    if frame["trial"].isna().any() or (frame["trial"] % 1 != 0).any():
        raise TableError(f"{path}: column trial must hold a trial number in every row")
    states = set(frame["state"].dropna()) - set(TrialState.__members__) if kind == "trials" else set()
    if states:
        raise TableError(f"{path}: column state holds {sorted(states)}, not trial states")
    frame = frame.assign(**{name: value for name, value in LATER_KNOBS.items() if name not in frame})
    columns = TRIAL_COLUMNS if kind == "trials" else CURVE_COLUMNS
    extra = [column for column in frame if column not in columns]
    return normalise(frame.reindex(columns=[*columns, *extra]).astype({"trial": "int64"}))


def load(source: str | Path | optuna.Study, study_name: str | None = None, curves: bool = False) -> pd.DataFrame:
    """One row per trial (or per trial and epoch with ``curves=True``), plain column names.

    Args:
        source: an ``optuna.Study``; a results folder (``DIR/<study>`` holding ``trials.csv``) or a CSV/Parquet
            file; or a storage URL (``sqlite:///...``, ``journal:...``, ``postgresql://...``) with ``study_name``.
        study_name: the study to read from a storage URL.
        curves: return the per-epoch table instead.

    Raises:
        FileNotFoundError: no tables at that path, or no storage file at that URL.
        TableError: a table that is not one (see :func:`read_table`).
        ValueError: a storage URL without ``study_name``, or without that study.
        TypeError: a ``source`` of none of these kinds.
    """
    if isinstance(source, optuna.Study):
        return study_frames(source)[1 if curves else 0]
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source={source!r} is not a results folder, a table file, a storage URL "
                        "nor an optuna.Study")
    text = str(source)
    if "://" in text or text.startswith("journal:"):
        return load(stored_study(text, study_name), curves=curves)
    path = Path(text)
    kind = "curves" if curves else "trials"
    if path.is_dir():
        path = path / f"{kind}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no results table at {path}; run python -m continuum.sweep first")
    return read_table(path, kind)


def stored_study(url: str, study_name: str | None) -> optuna.Study:
    """The study ``study_name`` in the storage at ``url``, for reading: a storage file that is not there is not
    created, and a journal is read as it is (a sweep may be writing to it).

    Args:
        url: ``sqlite:///PATH``, ``journal:PATH`` or a database server's URL (``postgresql://...``).
        study_name: the study.

    Raises:
        FileNotFoundError: no storage file at that path.
        ValueError: no ``study_name``, or no study of that name in the storage.
    """
    if study_name is None:
        raise ValueError(f"reading the storage {url} needs study_name=")
    file = storage_file(url)
    if file is not None and not file.is_file():
        raise FileNotFoundError(f"no study storage at {file} (from {url}); check the path")
    storage = JournalStorage(journal_backend(file)) if url.startswith("journal:") else url
    held = optuna.get_all_study_names(storage)
    if study_name not in held:
        raise ValueError(f"no study {study_name!r} in {url}; it holds {', '.join(map(repr, held)) or 'none'}")
    return optuna.load_study(study_name=study_name, storage=storage)


def load_model(folder: str | Path, trial: int | None = None, device: str | torch.device = "cpu", **point: Any
               ) -> torch.nn.Module:
    """The trained model of one completed trial of a study run with ``--save-models``, rebuilt exactly (the same
    architecture and weights; in eval mode).

    Args:
        folder: the study's results folder.
        trial: the trial's number; or leave it out and pick the trial by its point instead.
        device: where the model goes.
        point: point columns that pick the one completed trial (``segments="all", seed=0``).

    Raises:
        ValueError: no completed trial, or several, match; or a column that is not a point column.
        FileNotFoundError: no tables, or the trial saved no model (run the sweep with ``--save-models``).
    """
    folder = Path(folder)
    unknown = sorted(set(point) - set(POINT_COLUMNS))
    if unknown:
        raise ValueError(f"{unknown} are not point columns; pick a trial by trial= or by {', '.join(POINT_COLUMNS)}")
    done = load(folder)
    done = done[done["state"] == "COMPLETE"]
    criteria = {"trial": trial} if trial is not None else point
    for column, value in criteria.items():
        numeric = pd.api.types.is_numeric_dtype(done[column]) and not isinstance(value, str)
        done = done[done[column] == value] if numeric else done[done[column].astype(str) == str(value)]
    described = ", ".join(f"{k}={v!r}" for k, v in criteria.items()) or "no criteria"
    if done.empty:
        raise ValueError(f"no completed trial in {folder} matches {described}")
    if len(done) > 1:
        raise ValueError(f"{len(done)} trials match {described} (trials {', '.join(map(str, done['trial']))}); "
                         "name more point columns, or trial=")
    number = int(done["trial"].iloc[0])
    path = folder / "models" / f"trial_{number:04d}.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path}: trial {number} saved no model; run the sweep with --save-models")
    return load_checkpoint(path, device)[0]
