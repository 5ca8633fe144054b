"""Every committed ``results/*/summary.md`` regenerates exactly from the committed tables beside it (``trials.csv``,
``command.txt``), as ``python -m continuum.report`` draws it in a fresh clone: no number comes from elsewhere."""

import shutil
from pathlib import Path

import pytest

from continuum import campaign
from continuum.report import write_summary
from conftest import load_benchmark

RESULTS = Path(__file__).resolve().parent.parent / "results"
STUDIES = sorted(str(path.parent.relative_to(RESULTS)) for path in RESULTS.rglob("trials.csv"))


def test_the_committed_studies_are_found():
    assert {"default", "spectrum", "search"} <= set(STUDIES)


@pytest.mark.parametrize("name", STUDIES)
def test_committed_summary_regenerates_from_its_committed_tables(name, tmp_path):
    source, copy = RESULTS / name, tmp_path / name
    copy.mkdir(parents=True)
    for table in ("trials.csv", "curves.csv", "command.txt"):  # only what is committed, no local Parquet copy
        if (source / table).exists():
            shutil.copy(source / table, copy / table)
    assert write_summary(copy).read_text() == (source / "summary.md").read_text()


def test_the_campaign_report_regenerates_from_its_committed_tables(tmp_path):
    source, copy = RESULTS / "campaign", tmp_path / "campaign"
    for table in source.rglob("*"):  # the tables and command files only
        if table.name in ("trials.csv", "curves.csv", "latency.csv", "command.txt"):
            (copy / table.parent.relative_to(source)).mkdir(parents=True, exist_ok=True)
            shutil.copy(table, copy / table.relative_to(source))
    regenerated = campaign.report(copy, tmp_path / "README.md")  # results/README.md: the campaign's report
    assert regenerated.replace(str(tmp_path), "results") == (RESULTS / "README.md").read_text()
    assert not (source / "README.md").exists()  # one report, where the results start


def test_the_precision_comparison_regenerates_from_its_committed_tables(tmp_path):
    source = RESULTS / "precision"
    module = load_benchmark("precision_accuracy")
    for side in module.SIDES:
        (tmp_path / f"precision_{side}").mkdir()
        shutil.copy(source / f"precision_{side}" / "trials.csv", tmp_path / f"precision_{side}" / "trials.csv")
    assert module.report(tmp_path) == (source / "README.md").read_text()
    assert "--precision auto` trains in bf16 where it is native" in module.report(tmp_path)
