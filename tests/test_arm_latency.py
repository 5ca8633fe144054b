"""Quiet-machine latency per arm: every arm rebuilt from the table as it trained, timed, refused when busy; the
campaign report's accuracy-latency table."""

import pandas as pd
import pytest

from continuum import arm_latency, campaign, cost
from continuum.config import ModelConfig
from continuum.data import make_synthetic
from continuum.sweep.points import build_model
from continuum.sweep.record import TRIAL_COLUMNS, point_cells

ARMS = [ModelConfig(segments=1, width=0.25), ModelConfig(segments="all", width=0.5)]


def _study(folder, arms=ARMS, seeds=(0, 1), params=None):
    """A finished synthetic study's trials.csv, each arm with the parameters it builds with."""
    data = make_synthetic()
    rows = []
    for config in arms:
        built = sum(p.numel() for p in build_model(config.validate(), data).parameters())
        for seed in seeds:
            rows.append(point_cells(config.validate().to_dict() | {"lr": 0.05, "seed": seed})
                        | {"trial": len(rows), "state": "COMPLETE", "dataset": "synthetic", "params": params or built,
                           "test_acc": 0.8 + 0.1 * (config.segments == "all"), "val_acc": 0.8,
                           "flops": 2e6 + 1e6 * (config.segments == "all")})
    folder.mkdir(parents=True)
    pd.DataFrame(rows, columns=TRIAL_COLUMNS).to_csv(folder / "trials.csv", index=False)
    return folder


def test_each_arm_is_timed_once_and_the_report_shows_accuracy_against_latency(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cost, "CONTENDED_LOAD", 1.0)  # the tests share the machine: the timing, not the quiet
    folder = _study(tmp_path / "spectrum_params")
    assert arm_latency.main([str(folder), "--batch-size", "4", "--repeats", "2"]) == 0
    table = pd.read_csv(folder / "latency.csv")
    assert list(table.columns) == arm_latency.LATENCY_COLUMNS and len(table) == 2
    assert list(table["segments"].astype(str)) == ["1", "all"] and (table["latency_ms"] > 0).all()
    assert set(table["batch_size"]) == {4} and "wrote" in capsys.readouterr().out
    lines = campaign.cost_lines("spectrum_params", tmp_path, campaign.load(folder))
    assert "the highest test accuracy at segments all; the accuracy-FLOPs front at segments 1, all; the " \
        "accuracy-latency front at segments " in lines[0]  # all: more accurate and more FLOPs; its latency as timed
    assert lines[0].endswith(" all.")  # the most accurate arm is on every front
    assert lines[2].startswith("Test accuracy against FLOPs per image and against inference latency on a quiet")
    header, _, *rows = lines[4].splitlines()
    assert header.split("|")[-3:-1] == [" FLOPs front   ", " latency front   "]
    assert [row.split("|")[-3].strip() for row in rows] == ["yes", "yes"] and rows[1].split("|")[-2].strip() == "yes"


def test_a_busy_machine_or_an_arm_that_rebuilds_otherwise_is_refused(tmp_path, monkeypatch, capsys):
    folder = _study(tmp_path / "busy")
    monkeypatch.setattr(cost, "CONTENDED_LOAD", -1.0)  # any measured load counts as busy
    assert arm_latency.main([str(folder), "--batch-size", "2", "--repeats", "1"]) == 1
    assert "rerun on a quiet machine" in capsys.readouterr().err and not (folder / "latency.csv").exists()
    other = _study(tmp_path / "other", params=123)
    assert arm_latency.main([str(other)]) == 2
    assert "rebuilds with" in capsys.readouterr().err
    assert arm_latency.main([str(tmp_path / "nothing")]) == 2
    assert arm_latency.main([str(folder), "--repeats", "0"]) == 2
    assert arm_latency.main([str(folder), "--device", "abacus"]) == 2
    assert "device 'abacus' is not valid" in capsys.readouterr().err


def test_the_report_says_how_to_measure_when_nothing_was(tmp_path):
    folder = _study(tmp_path / "spectrum_flops", seeds=(0,))
    lines = campaign.cost_lines("spectrum_flops", tmp_path, campaign.load(folder))
    assert lines[0].endswith("the accuracy-FLOPs front at segments 1, all.")  # no latency front before it is timed
    assert lines[-2].startswith("Quiet-machine latency: not measured yet (`python -m continuum.arm_latency")
    assert "latency front" not in lines[4] and "FLOPs front" in lines[4]
    uncounted = campaign.load(folder).assign(flops=float("nan"))  # no FLOPs recorded: no front claimed on them
    first = campaign.cost_lines("spectrum_flops", tmp_path, uncounted)[0]
    assert first.endswith("noise): the highest test accuracy at segments all.")
    assert campaign.cost_lines("spectrum_flops", tmp_path, uncounted.assign(state="RUNNING")) == []  # none finished


@pytest.fixture(autouse=True)
def _native_convs(monkeypatch):
    """Time the plain grouped conv: the tests check what is timed, not which kernel is fastest."""
    monkeypatch.setenv("CONTINUUM_CONV_STRATEGY", "native")
