"""Several studies taking turns on one set of local workers (``--config A --config B --workers N``): a worker with
nothing to start in one study takes the next study's points instead of idling beside the last trial; a study waits
for the ``lr_study`` it reads; bad combinations are refused before anything runs."""

import dataclasses
import logging

import pandas as pd
import pytest

from continuum import results
from continuum.data import load_dataset
from continuum.sweep import cli
from continuum.sweep.cli import main, prepare
from continuum.sweep.objective import worker_id
from continuum.sweep.settings import from_settings
from continuum.sweep.study import run, storage_url
from continuum.sweep.workers import StudyQueue

BASE = {"dataset": "synthetic", "width": 0.25, "segments": "1", "train_size": 256, "val_size": 128, "epochs": 1,
        "batch_size": 64, "workers": 2}
"""Trials of about a second (as conftest's FAST), on the queue's two workers."""

STUDIES = {"a_lr": {"lr": "0.05,0.1"}, "a": {"lr": "tuned", "lr_study": "a_lr"}, "c": {"segments": "1,all"}}
"""A learning-rate study, the study that reads it, and an independent one listed last."""


@dataclasses.dataclass
class _Process:
    """A worker process as the queue sees it (none runs)."""

    pid: int
    returncode: int | None = None


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the trial this test asks for stands for a worker's
def test_a_free_worker_takes_the_next_study_while_the_last_trial_runs_and_a_reader_waits(tmp_path, native_kernels):
    cfgs = [from_settings(BASE | {"out": str(tmp_path), "study": name} | own) for name, own in STUDIES.items()]
    data = prepare(cfgs[0])
    finished = []
    queue = StudyQueue(cfgs, [data] * 3, after_study=finished.append)
    rates, reader, other = queue.studies
    assert queue.next_study([]) is rates and rates.free_trials() == 2
    first = _Process(pid=10**7)
    rates.study.ask().set_user_attr("worker", worker_id(first.pid))  # a worker runs a_lr's first point
    assert queue.next_study([(first, rates)]) is rates  # its second point is free
    second = (_Process(pid=10**7 + 1), rates)  # a second worker starts on it, not yet in a trial
    assert queue.next_study([(first, rates), second]) is other  # not a third on a_lr; a waits for a_lr
    assert reader.study is None
    queue.finish_complete([], progress=False)
    assert not rates.finished and not finished  # a trial still runs
    first.returncode = -9
    queue.lose(rates, first)  # the first worker died: its point is queued again
    assert rates.lost == 1 and rates.free_trials() == 2 and rates.error is None
    run(dataclasses.replace(rates.cfg, workers=1, storage=storage_url(rates.cfg)), data, progress=False, wait=False)
    queue.finish_complete([], progress=False)
    assert rates.finished and finished == [tmp_path / "a_lr"]
    assert queue.next_study([]) is reader and len(reader.grid) == 1  # a's turn comes before c's
    assert '"lr": 0.05' in reader.grid[0] or '"lr": 0.1' in reader.grid[0]  # the rate a_lr chose


def _configs(tmp_path, studies: dict[str, dict]) -> list[str]:
    """``--config FILE`` for each study, its file holding these settings."""
    configs = []
    for i, (name, settings) in enumerate(studies.items()):
        path = tmp_path / f"{i}.toml"
        path.write_text("".join(f"{key} = {value!r}\n".replace("'", '"') for key, value in settings.items()))
        configs += ["--config", str(path)]
    return configs


def test_studies_take_turns_on_two_workers_and_each_point_runs_once(tmp_path, caplog, monkeypatch, native_kernels):
    configs = _configs(tmp_path, {name: BASE | {"study": name} | own for name, own in STUDIES.items()})
    loads = []
    monkeypatch.setattr(cli, "load_dataset", lambda *args: loads.append(args) or load_dataset(*args))
    with caplog.at_level(logging.WARNING):
        assert main([*configs, "--out", str(tmp_path), "--quiet"]) == 0
    assert len(loads) == 1  # the three studies' data settings are the same: one copy, loaded once
    tables = {name: results.load(tmp_path / name) for name in STUDIES}
    assert {name: len(table) for name, table in tables.items()} == {"a_lr": 2, "a": 1, "c": 2}
    for name, table in tables.items():
        assert (table["state"] == "COMPLETE").all() and not table.duplicated(["segments", "lr"]).any(), name
        assert (tmp_path / name / "trials.parquet").exists() and (tmp_path / name / "summary.md").exists()
        assert f"study {name} complete" in caplog.text
    assert pd.to_datetime(tables["a"]["started"]).min() > pd.to_datetime(tables["a_lr"]["completed"]).max()
    assert tables["a"]["lr"].item() in (0.05, 0.1)
    assert "2 workers on journal:" in caplog.text


@pytest.mark.parametrize("studies, workers, message", [
    (["a_lr", "a_lr"], [2, 2], "study 'a_lr' is listed twice; give each study once"),
    (["a", "a_lr"], [2, 2], "study 'a' reads study 'a_lr', which is listed after it; give a_lr's --config first"),
    (["a_lr", "c"], [2, 1], "the studies ask for different numbers of workers (a_lr: 2, c: 1); give --workers N"),
])
def test_studies_that_cannot_take_turns_are_refused_before_anything_runs(tmp_path, capsys, studies, workers,
                                                                          message):
    configs = _configs(tmp_path, {i: {"study": name, "workers": count, "dataset": "synthetic"} | STUDIES[name]
                                  for i, (name, count) in enumerate(zip(studies, workers))})
    assert main([*configs, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
