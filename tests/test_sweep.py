"""python -m continuum.sweep end to end: tables, resumption after Ctrl-C and SIGKILL, search modes, bad input."""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import torch
import pytest

from continuum import SegmentedConv2d, report, results
from continuum.config import ModelConfig
from continuum.cost import model_cost
from continuum.data import make_synthetic
from continuum.sweep.cli import main
from continuum.sweep import points
from continuum.sweep.points import DUPLICATE, build_model, match_width
from continuum.sweep.record import TRIAL_COLUMNS
from continuum.sweep.settings import from_settings
from conftest import FAST, SYNTHETIC


@pytest.fixture(scope="module")
def existing_study(tmp_path_factory) -> Path:
    """A results root holding a finished one-point study, to copy into tests that must leave it untouched."""
    root = tmp_path_factory.mktemp("existing")
    assert main([*FAST, "--out", str(root), "--segments", "1"]) == 0
    return root


def sweep(tmp_path: Path, *args: str) -> int:
    return main([*FAST, "--out", str(tmp_path), *args])


def states(tmp_path: Path, study: str = "default") -> pd.DataFrame:
    loaded = optuna.load_study(study_name=study, storage=f"sqlite:///{tmp_path / study / 'study.db'}")
    return pd.DataFrame([{"number": t.number, "state": t.state.name, "point": t.user_attrs.get("point"),
                          "reason": t.user_attrs.get("fail_reason")} for t in loaded.get_trials()])


def test_synthetic_sweep_end_to_end(tmp_path, capsys):
    assert sweep(tmp_path, "--segments", "1,all", "--seeds", "0,1") == 0
    folder = tmp_path / "default"
    trials = results.load(folder)
    assert len(trials) == 4 and set(trials["state"]) == {"COMPLETE"}
    assert sorted(zip(trials["segments"], trials["seed"])) == [("1", 0), ("1", 1), ("all", 0), ("all", 1)]
    for column in ("model", "order", "mid_act", "residual", "width", "val_acc", "val_loss", "best_val_acc", "params",
                   "macs", "flops", "latency_ms", "wall_s", "device", "torch", "epochs", "images_per_s", "threads",
                   "python", "timm", "optuna", "conv_strategies", "channels_last", "compile"):
        assert trials[column].notna().all(), column
    assert (trials["flops"] == 2 * trials["macs"]).all() and not trials["compile"].any()
    assert trials["cuda"].notna().all() == torch.cuda.is_available()  # --device auto: the GPU where there is one
    assert trials["conv_strategies"].str.fullmatch(r"(native|.* #[0-9a-f]{8})").all()
    assert trials.set_index("segments")["params"].loc["1"].iloc[0] == 99_050  # continuum_small at width 0.25
    curves = results.load(folder, curves=True)
    assert len(curves) == 4 and set(curves["epoch"]) == {1}
    summary = (folder / "summary.md").read_text()
    assert "python -m continuum.sweep" in summary and "| all " in summary
    for plot in ("curves.png", "spectrum.png", "edf.png", "pareto_macs.png", "pareto_latency.png"):
        assert (folder / plot).stat().st_size > 1000
    assert "results:" in capsys.readouterr().out


def test_rerun_skips_completed_points_and_adds_new_ones(tmp_path):
    assert sweep(tmp_path, "--segments", "1,all") == 0
    first = results.load(tmp_path / "default")
    assert sweep(tmp_path, "--segments", "1,all") == 0
    assert len(states(tmp_path)) == 2
    assert sweep(tmp_path, "--segments", "1,4,all") == 0
    after = results.load(tmp_path / "default")
    assert list(after["segments"]) == ["1", "all", "4"]
    pd.testing.assert_frame_equal(after.iloc[:2][["trial", "val_acc"]], first[["trial", "val_acc"]])


def test_results_load_round_trip(tmp_path):
    assert sweep(tmp_path, "--segments", "2,all", "--mid-act", "none,relu") == 0
    study = optuna.load_study(study_name="default", storage=f"sqlite:///{tmp_path / 'default' / 'study.db'}")
    from_study = results.normalise(results.load(study))
    from_csv = results.load(tmp_path / "default")
    from_url = results.normalise(results.load(f"sqlite:///{tmp_path / 'default' / 'study.db'}", study_name="default"))
    csv_only = results.load(tmp_path / "default" / "trials.csv")
    for frame in (from_csv, from_url, csv_only):
        assert list(frame.columns) == TRIAL_COLUMNS
        pd.testing.assert_frame_equal(frame[["trial", "segments", "mid_act", "val_acc", "params"]],
                                      from_study[["trial", "segments", "mid_act", "val_acc", "params"]],
                                      check_dtype=False)
    assert set(from_csv["mid_act"]) == {"none", "relu"}


def test_report_regenerates_summary_and_plots_from_tables_alone(tmp_path):
    assert sweep(tmp_path, "--segments", "1,all") == 0
    folder = tmp_path / "default"
    (folder / "study.db").unlink()
    for path in [folder / "summary.md", *folder.glob("*.png")]:
        path.unlink()
    assert report.main([str(folder)]) == 0  # from the shell: test_hostile.py
    assert (folder / "summary.md").exists() and len(list(folder.glob("*.png"))) == 5


def test_match_params_scales_width_within_two_percent():
    data = make_synthetic()
    for segments in (1, 4, "all"):
        config = match_width(ModelConfig(segments=segments).validate(), 300_000, data)
        params = sum(p.numel() for p in build_model(config, data).parameters())
        assert abs(params - 300_000) <= 6_000, (segments, params)


def test_match_params_matches_an_inception_style_net_too():
    data = make_synthetic()
    config = match_width(ModelConfig(model="continuum_inception_small").validate(), 300_000, data)
    assert abs(sum(p.numel() for p in build_model(config, data).parameters()) - 300_000) <= 6_000
    with pytest.raises(ValueError, match="does not take these settings"):
        build_model(ModelConfig(model="continuum_inception_small", segments=4).validate(), data)


def test_match_params_sweep_records_the_width(tmp_path):
    assert main([*SYNTHETIC, "--out", str(tmp_path), "--segments", "1,all", "--match-params", "250000"]) == 0
    trials = results.load(tmp_path / "default")
    assert ((trials["params"] - 250_000).abs() <= 5_000).all()
    assert trials.set_index("segments").loc["1", "width"] < 1 < trials.set_index("segments").loc["all", "width"]


@pytest.mark.parametrize("search,extra", [("tpe", []), ("nsga2", ["--objectives", "val_acc,flops"])])
def test_search_modes(tmp_path, search, extra):
    args = ["--search", search, "--n-trials", "3", "--segments", "1,4,all", "--seeds", "0,1", *extra]
    assert sweep(tmp_path, *args) == 0
    trials = results.load(tmp_path / "default")
    assert len(trials) == 3 and set(trials["state"]) == {"COMPLETE"}
    assert sorted(trials["seed"]) == [0, 0, 1]  # seeds cycle over the trials
    assert all(s.count("/") == 2 for s in trials["segments"])  # one value per stage
    assert sweep(tmp_path, *args) == 0  # rerun: already 3 trials, nothing to do
    assert len(results.load(tmp_path / "default")) == 3
    if search == "nsga2":  # generations of 2 (a quarter of 3 trials, at least 2): the third trial is bred
        study = optuna.load_study(study_name="default", storage=f"sqlite:///{tmp_path / 'default' / 'study.db'}")
        assert [t.system_attrs["NSGAIISampler:generation"] for t in study.trials] == [0, 0, 1]


def test_a_resumed_search_draws_new_points_not_the_ones_it_drew_before_its_stop(tmp_path):
    args = ["--search", "tpe", "--segments", "1,4,all"]
    assert sweep(tmp_path, *args, "--n-trials", "1") == 0
    assert sweep(tmp_path, *args, "--n-trials", "2") == 0  # topped up: a sampler seeded anew
    assert results.load(tmp_path / "default")["segments"].is_unique


def test_experiment_file_gives_the_same_settings(tmp_path):
    config = tmp_path / "exp.toml"
    config.write_text('study = "fromfile"\nsegments = [1, "all"]\nseeds = [3]\n[data]\ndataset = "synthetic"\n'
                      '[train]\nepochs = 1\nbatch_size = 64\n')
    assert main(["--config", str(config), "--out", str(tmp_path), "--quiet"]) == 0
    trials = results.load(tmp_path / "fromfile")
    assert list(trials["seed"]) == [3, 3] and list(trials["segments"]) == ["1", "all"]


def test_an_experiment_files_storage_follows_out(tmp_path):
    """``{out}`` and ``{study}`` in the storage: the same file runs a second campaign under another root."""
    config = tmp_path / "exp.toml"
    config.write_text('study = "moved"\nstorage = "journal:{out}/{study}/journal.log"\nout = "unused"\n')
    for root in ("cpu", "gpu"):
        assert main(["--config", str(config), *FAST, "--segments", "1", "--out", str(tmp_path / root)]) == 0
        assert (tmp_path / root / "moved" / "journal.log").stat().st_size > 0
        assert len(results.load(tmp_path / root / "moved")) == 1
    assert not (tmp_path / "unused").exists()


def test_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    assert sweep(tmp_path, "--segments", "1,all", "--lr", "1e30") == 0
    trials = results.load(tmp_path / "default")
    assert set(trials["state"]) == {"FAIL"}
    assert trials["fail_reason"].str.contains("non-finite training loss").all()
    assert "non-finite training loss" in (tmp_path / "default" / "summary.md").read_text()


def _spawn(tmp_path: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "continuum.sweep", "--dataset", "synthetic", "--quiet", "--out", str(tmp_path),
               "--batch-size", "32", *args]
    # SIGINT back to its default: a test run started in the background of a shell inherits it ignored
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_running(tmp_path: Path, completed: int, timeout: float = 300) -> None:
    """Wait until ``completed`` trials are COMPLETE and another one has finished at least one epoch."""
    db = tmp_path / "default" / "study.db"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as connection:
                done = connection.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
                running = connection.execute(
                    "select count(*) from trials t join trial_user_attributes a on a.trial_id = t.trial_id "
                    "where t.state = 'RUNNING' and a.key = 'epochs_done'").fetchone()[0]
            if done >= completed and running:
                return
        except sqlite3.OperationalError:
            pass  # not created yet, or its tables not yet
        time.sleep(0.2)
    raise AssertionError("the sweep did not reach a running trial in time")


def _assert_each_point_complete_once(tmp_path: Path, points: int) -> pd.DataFrame:
    table = states(tmp_path)
    complete = table[table["state"] == "COMPLETE"]
    assert len(complete) == points and complete["point"].is_unique
    assert set(table["state"]) <= {"COMPLETE", "FAIL"}
    trials = results.load(tmp_path / "default")
    assert (trials[trials["state"] == "COMPLETE"]).groupby(["segments", "seed"]).size().eq(1).all()
    return table


AXES = ["--segments", "1,all", "--seeds", "0,1", "--epochs", "4", "--width", "0.25", "--train-size", "256",
        "--val-size", "128"]
"""Four points of four short epochs (a quarter-width net): time to stop one mid-trial."""


def test_ctrl_c_leaves_the_study_consistent_and_a_rerun_completes_it(tmp_path):
    process = _spawn(tmp_path, *AXES)
    _wait_for_running(tmp_path, completed=1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "rerun the same command to resume" in stderr
    table = states(tmp_path)
    assert "RUNNING" not in set(table["state"]) and (table["reason"] == "interrupted").sum() == 1
    started = table[table["state"] != "WAITING"]
    assert list(results.load(tmp_path / "default")["trial"]) == list(started["number"])
    rerun = _spawn(tmp_path, *AXES)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    table = _assert_each_point_complete_once(tmp_path, 4)
    stood_down = table["reason"].fillna("").str.startswith(DUPLICATE)  # where the stopped point ran first
    assert len(table[~stood_down]) == 5 and stood_down.sum() <= 1
    commands = (tmp_path / "default" / "command.txt").read_text().splitlines()
    assert len(commands) == 1 and "--segments 1,all" in commands[0]  # the resume by the same command: recorded once


@pytest.mark.slow
def test_sigterm_stops_workers_started_from_a_background_script(tmp_path):
    """A sweep started with ``&`` from a script inherits SIGINT ignored; SIGTERM must still stop it and its workers."""
    command = [sys.executable, "-m", "continuum.sweep", "--dataset", "synthetic", "--quiet", "--out", str(tmp_path),
               "--batch-size", "32", "--workers", "2", *AXES]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    journal = tmp_path / "default" / "study.journal"  # several local workers share a journal file
    deadline = time.time() + 300
    while not (journal.exists() and "epochs_done" in journal.read_text()):  # a trial has finished an epoch
        assert time.time() < deadline and process.poll() is None, "the sweep did not reach a running trial in time"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "rerun the same command to resume" in stderr, stderr
    trials = results.load(tmp_path / "default")
    assert "RUNNING" not in set(trials["state"]) and (trials["fail_reason"] == "interrupted").sum() >= 1


@pytest.mark.slow  # SIGKILL on a journal: test_faults.py
def test_sigkill_loses_only_the_trial_in_progress(tmp_path):
    process = _spawn(tmp_path, *AXES, "--heartbeat", "1")
    _wait_for_running(tmp_path, completed=1)
    process.kill()
    process.wait(timeout=30)
    table = states(tmp_path)
    assert (table["state"] == "COMPLETE").sum() >= 1 and (table["state"] == "RUNNING").sum() == 1
    rerun = _spawn(tmp_path, *AXES, "--heartbeat", "1")
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    table = _assert_each_point_complete_once(tmp_path, 4)
    stood_down = table["reason"].fillna("").str.startswith(DUPLICATE)  # where the stopped point ran first
    assert (table["state"] == "FAIL")[~stood_down].sum() == 1 and stood_down.sum() <= 1
    trials = results.load(tmp_path / "default")
    assert "worker stopped" in trials.loc[trials["state"] == "FAIL", "fail_reason"].iloc[0]


@pytest.mark.parametrize("args,message", [
    (["--order", "sideways"], "order='sideways' is not valid"),
    (["--segments", "1,five"], "segments='five' is not valid"),
    (["--mid-act", "wobble"], "mid_act='wobble' is not valid"),
    (["--residual", "maybe"], "'maybe' is not valid; use on or off"),
    (["--segments", "5"], "stages.stage1.0.rep.0.spatial: segments=5 does not fit in_channels=32"),
    (["--model", "nonet"], "model 'nonet' is not registered"),
    (["--model", "continuum_xception", "--width", "2"], "does not take these settings"),
    (["--dataset", "imagefolder:/nonexistent/folder"], "imagefolder:/nonexistent/folder"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--storage", "mongodb://x"], "--storage 'mongodb://x' is not valid; use sqlite:///PATH, postgresql://"),
    (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open storage postgresql://nobody@127.0.0.1:1/none"),
    (["--epochs", "0"], "epochs=0 is not valid"),
    (["--recipe", "adamw"], "recipe='adamw' is not valid"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    (["--config", "/nonexistent.toml"], "--config /nonexistent.toml: no such file"),
    (["--match-params", "1000", "--segments", "32"], "--match-params 1000: segments=32 gets no closer"),
    (["--lr", "0.05", "--lr-extend"], "lr_extend steps beyond the edges of a grid's learning rates; give two or more"),
    (["--lr", "0.05,0.1", "--lr-extend", "--search", "tpe"], "several learning rates are a grid axis"),
    (["--lr", "tuned", "--lr-study", "x", "--lr-extend"], "lr_extend steps beyond the edges"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(existing_study, tmp_path, capsys, args, message):
    shutil.copytree(existing_study, tmp_path, dirs_exist_ok=True)
    folder = tmp_path / "default"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    capsys.readouterr()
    assert main(["--quiet", "--out", str(tmp_path), "--dataset", "synthetic", *args]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and stderr.count("\n") == 1
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_other_settings_on_an_existing_study_are_refused(existing_study, tmp_path, capsys):
    shutil.copytree(existing_study, tmp_path, dirs_exist_ok=True)
    before = (tmp_path / "default" / "study.db").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*FAST, "--out", str(tmp_path), "--epochs", "2", "--segments", "1"]) == 2
    assert "study 'default' was run with other settings: train.epochs (1 there, 2 now)" in capsys.readouterr().err
    assert (tmp_path / "default" / "study.db").stat().st_mtime_ns == before


def test_cli_settings_parse():
    cfg = from_settings({"segments": "1,4,all", "order": "depthwise_first,pointwise-first", "residual": "on,off",
                        "mid_act": "none,relu", "seeds": "0,1", "epochs": "5", "train_size": "0"})
    assert cfg.segments == (1, 4, "all") and cfg.orders == ("depthwise_first", "pointwise_first")
    assert cfg.residuals == (True, False) and cfg.mid_acts == (None, "relu") and cfg.train.epochs == 5
    search = from_settings({"search": "nsga2"})
    assert search.objectives == ("val_acc", "flops") and "all" in search.segments
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['colour'\]"):
        from_settings({"colour": "red"})


def test_retry_failed_reruns_a_failed_point_once_not_for_ever(tmp_path):
    diverging = ["--segments", "1", "--lr", "1e30"]  # a non-finite loss in its first epoch, every time
    assert sweep(tmp_path, *diverging) == 0
    assert sweep(tmp_path, *diverging) == 0 and len(states(tmp_path)) == 1  # a lasting failure is not rerun
    assert sweep(tmp_path, *diverging, "--retry-failed") == 0
    table = states(tmp_path)
    assert list(table["state"]) == ["FAIL", "FAIL"] and table["reason"].str.startswith("non-finite").all()
    assert sweep(tmp_path, *diverging, "--retry-failed") == 0 and len(states(tmp_path)) == 2  # failed again: done


def test_pruner_stops_weak_trials_and_they_count_as_done(tmp_path):
    args = ["--segments", "1,4,all", "--seeds", "0,1", "--epochs", "2", "--pruner", "median"]
    assert sweep(tmp_path, *args) == 0
    table = states(tmp_path)
    assert set(table["state"]) <= {"COMPLETE", "PRUNED"} and len(table) == 6
    assert sweep(tmp_path, *args) == 0
    assert len(states(tmp_path)) == 6


@pytest.mark.slow
def test_compiled_model_trains(tmp_path):
    assert sweep(tmp_path, "--segments", "all", "--compile") == 0
    trials = results.load(tmp_path / "default")
    assert set(trials["state"]) == {"COMPLETE"} and trials["compile"].all()


def test_new_axes_segment_width_kernel_size_and_depths_are_columns_and_change_the_model(tmp_path):
    assert sweep(tmp_path, "--segment-width", "8", "--kernel-size", "5", "--depths", "1,2/1/1") == 0
    trials = results.load(tmp_path / "default")
    assert len(trials) == 2 and set(trials["state"]) == {"COMPLETE"}
    assert set(trials["segment_width"]) == {8} and set(trials["segments"]) == {"none"}
    assert set(trials["kernel_size"]) == {5} and sorted(trials["depths"].astype(str)) == ["1", "2/1/1"]
    params = trials.set_index(trials["depths"].astype(str))["params"]
    three = build_model(ModelConfig(segment_width=8, depths=1, width=0.25).validate(), make_synthetic())
    assert params.loc["2/1/1"] > params.loc["1"] > sum(p.numel() for p in three.parameters())
    built = build_model(ModelConfig(segment_width=8, kernel_size=5, depths=(2, 1, 1)).validate(), make_synthetic())
    assert len(built.stages.stage1) == 2 and len(built.stages.stage2) == 1
    spatial = [m for m in built.modules() if isinstance(m, SegmentedConv2d)]
    assert {m.kernel_size for m in spatial} == {(5, 5)}
    assert all(m.segments == m.in_channels // 8 for m in spatial)


def test_match_flops_scales_width_to_equal_flops():
    data = make_synthetic()
    widths = {}
    for segments in (1, "all"):
        config = match_width(ModelConfig(segments=segments).validate(), 60_000_000, data, "flops")
        assert abs(model_cost(build_model(config, data), data.input_size).flops - 60_000_000) <= 1_200_000
        widths[segments] = config.width
    assert widths[1] < 1 < widths["all"]
    with pytest.raises(ValueError, match="--match-flops 1000: segments=1 gets no closer than"):
        match_width(ModelConfig(segments=1).validate(), 1000, data, "flops")


def test_a_points_matched_width_is_searched_once_per_process(monkeypatch):
    """The parent's checks, its tuning and every trial ask for the same point's width: searched once, the same
    answer after; another budget, measure, image size or class count searches again."""
    searches = []
    monkeypatch.setattr(points, "_searched_width",
                        lambda *args, search=points._searched_width: searches.append(args[1:]) or search(*args))
    monkeypatch.setattr(points, "MATCHED_WIDTHS", {})
    data, config = make_synthetic(train_size=16, val_size=16), ModelConfig(segments=4).validate()
    first = match_width(config, 300_000, data)
    assert match_width(ModelConfig(segments=4).validate(), 300_000, data) == first and len(searches) == 1
    match_width(config, 250_000, data)
    match_width(config, 300_000, data, "flops")
    match_width(config, 300_000, make_synthetic(num_classes=5, train_size=16, val_size=16))
    match_width(config, 300_000, make_synthetic(train_size=16, val_size=16, input_size=(3, 28, 28)))
    assert len(searches) == 5


@pytest.mark.parametrize("args,message", [
    (["--kernel-size", "4"], "kernel_size=4 is not valid; use an odd int"),
    (["--depths", "0"], "depths='0' is not valid"),
    (["--segment-width", "8", "--segments", "4"], "give one of them"),
    (["--match-params", "1000", "--match-flops", "1000"], "give one of them"),
    (["--match-flops", "1000", "--width", "2"], "match_flops needs no explicit widths"),
])
def test_new_axes_refuse_bad_values(tmp_path, capsys, args, message):
    assert sweep(tmp_path, *args) == 2
    assert message in capsys.readouterr().err
