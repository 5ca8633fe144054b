"""A study or a results folder -> one tidy pandas DataFrame, one row per trial, plain column names.

Tables written next to a study (``DIR/<study>/``, by :func:`continuum.sweep.study.export`): ``trials.csv``
(+ ``trials.parquet`` with pyarrow), ``curves.csv`` (one row per trial and epoch); their columns are
:data:`~continuum.sweep.record.TRIAL_COLUMNS` and :data:`~continuum.sweep.record.CURVE_COLUMNS`.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd

from continuum.sweep.record import study_frames
from continuum.sweep.study import has_parquet


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
        path = parquet if parquet.exists() and has_parquet() else csv
    if not path.exists():
        raise FileNotFoundError(f"no results table at {path}; run python -m continuum.sweep first")
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    return normalise(frame)
