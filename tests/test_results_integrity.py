"""Every committed ``results/*/summary.md`` regenerates exactly from the committed tables beside it (``trials.csv``,
``command.txt``), as ``python -m continuum.report`` draws it in a fresh clone: no number comes from elsewhere."""

import shutil
from pathlib import Path

import pytest

from continuum.report import write_summary

RESULTS = Path(__file__).resolve().parent.parent / "results"
STUDIES = sorted(path.parent.name for path in RESULTS.glob("*/trials.csv"))


def test_the_committed_studies_are_found():
    assert {"default", "spectrum", "search"} <= set(STUDIES)


@pytest.mark.parametrize("name", STUDIES)
def test_committed_summary_regenerates_from_its_committed_tables(name, tmp_path):
    source, copy = RESULTS / name, tmp_path / name
    copy.mkdir()
    for table in ("trials.csv", "curves.csv", "command.txt"):  # only what is committed, no local Parquet copy
        if (source / table).exists():
            shutil.copy(source / table, copy / table)
    assert write_summary(copy).read_text() == (source / "summary.md").read_text()
