"""A study's results tables, ``trials.csv`` and ``curves.csv``, kept current after every trial at a cost that does not
grow with the study.

A finished trial never changes, so its rows are converted (and formatted as CSV lines) once and kept; each update
converts only the trials that are new or still running (Optuna's storages read only those from the database), and
writing a table joins the kept lines. The files are written atomically, so a reader (or a killed writer) never sees
half a table.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterable

import optuna
import pandas as pd

from continuum.files import atomic_write
from continuum.sweep.record import CURVE_COLUMNS, TRIAL_COLUMNS, TrialRows, frames, trial_rows


def csv_lines(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    """``rows`` as CSV lines (``None`` as an empty cell, quoting as pandas does)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows([row.get(column) for column in columns] for row in rows)
    return buffer.getvalue()


class StudyTables:
    """The results tables of one study, updated incrementally.

    Args:
        study: the study.
        folder: where ``trials.csv`` and ``curves.csv`` go.
    """

    def __init__(self, study: optuna.Study, folder: Path) -> None:
        self.study = study
        self.folder = folder
        self._finished: dict[int, TrialRows | None] = {}  # trial number -> its rows (None: it trained nothing)
        self._lines: dict[int, tuple[str, str]] = {}  # trial number -> its CSV lines in trials.csv, curves.csv
        self._unfinished: list[TrialRows] = []

    def update(self) -> None:
        """Take in the trials that finished or started since the last update."""
        self._unfinished = []
        for trial in self.study.get_trials(deepcopy=False):
            if trial.number in self._finished:
                continue
            rows = trial_rows(trial)
            if trial.state.is_finished():
                self._finished[trial.number] = rows
                if rows is not None:
                    self._lines[trial.number] = (csv_lines([rows[0]], TRIAL_COLUMNS), csv_lines(rows[1], CURVE_COLUMNS))
            elif rows is not None:
                self._unfinished.append(rows)

    def trials(self) -> pd.DataFrame:
        """The trials table as of the last :meth:`update` (the curves, the larger table, are only written)."""
        finished = [rows for rows in self._finished.values() if rows is not None]
        return frames([(row, []) for row, _ in [*finished, *self._unfinished]])[0]

    def write(self) -> None:
        """Write ``trials.csv`` and ``curves.csv`` as of the last :meth:`update`, in trial order."""
        lines = dict(self._lines)
        for row, curve in self._unfinished:
            lines[row["trial"]] = (csv_lines([row], TRIAL_COLUMNS), csv_lines(curve, CURVE_COLUMNS))
        ordered = [lines[number] for number in sorted(lines)]
        for index, (name, columns) in enumerate((("trials.csv", TRIAL_COLUMNS), ("curves.csv", CURVE_COLUMNS))):
            text = csv_lines([dict(zip(columns, columns))], columns) + "".join(pair[index] for pair in ordered)
            atomic_write(self.folder / name, lambda path: path.write_text(text, encoding="utf-8"))
