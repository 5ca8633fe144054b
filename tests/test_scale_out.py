"""Many workers on one study: exactly once under SIGKILL and a database restart (real PostgreSQL), and local
--workers on a journal file."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from continuum import results

AXES = ["--segments", "1,2,4,8,16,32", "--seeds", "0,1", "--epochs", "2"]
"""12 grid points x seeds."""


def _worker(tmp_path: Path, storage: str, study: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "continuum.sweep", "--dataset", "synthetic", "--batch-size", "32", "--quiet",
               "--out", str(tmp_path), "--storage", storage, "--study", study, "--heartbeat", "1", *AXES, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def _trials(storage, study: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return []


def _running_trial(storage, study: str, timeout: float = 300) -> optuna.trial.FrozenTrial:
    """A RUNNING trial that has finished an epoch, once some trial is complete."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        trials = _trials(storage, study)
        running = [t for t in trials if t.state.name == "RUNNING" and t.user_attrs.get("epochs_done")]
        if running and any(t.state.name == "COMPLETE" for t in trials):
            return running[0]
        time.sleep(0.3)
    raise AssertionError("no running trial appeared in time")


def _kill_worker_mid_trial(storage, study: str) -> tuple[optuna.trial.FrozenTrial, int]:
    """SIGKILL a worker while it holds a RUNNING trial, and return that trial and the worker's pid.

    The worker is frozen first (SIGSTOP) and its trial read again: a trial seen running can complete before a kill
    lands, and the worker then holds the next one, or none between trials (thawed, and another try)."""
    while True:
        seen = _running_trial(storage, study)
        pid = int(seen.user_attrs["worker"].rsplit(":", 1)[1])
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.5)  # a write sent just before the stop reaches the storage
        held = [t for t in _trials(storage, study)
                if t.state.name == "RUNNING" and t.user_attrs.get("worker") == seen.user_attrs["worker"]]
        if held:
            os.kill(pid, signal.SIGKILL)
            return held[0], pid
        os.kill(pid, signal.SIGCONT)


def _assert_exactly_once(storage, study: str, points: int = 12) -> pd.DataFrame:
    trials = _trials(storage, study)
    complete = [t.user_attrs["point"] for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == points and len(set(complete)) == points
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    table = results.load(optuna.load_study(study_name=study, storage=storage))
    done = table[table["state"] == "COMPLETE"]
    assert len(done) == points and not done.duplicated(["segments", "seed"]).any()
    return table


def _wait_all(processes, timeout: float = 420) -> None:
    for process in processes:
        _, stderr = process.communicate(timeout=timeout)
        assert process.returncode == 0, stderr


@pytest.mark.slow
def test_three_workers_one_killed_mid_trial_each_point_completes_once(postgres, tmp_path):
    workers = [_worker(tmp_path, postgres.url, "killed") for _ in range(3)]
    victim, pid = _kill_worker_mid_trial(postgres.url, "killed")
    survivors = [w for w in workers if w.pid != pid]
    assert len(survivors) == 2
    _wait_all(survivors)
    table = _assert_exactly_once(postgres.url, "killed")
    killed = table[table["trial"] == victim.number]
    assert killed["state"].item() == "FAIL" and "no heartbeat" in killed["fail_reason"].item()


@pytest.mark.slow
def test_database_restart_mid_sweep(postgres, tmp_path):
    workers = [_worker(tmp_path, postgres.url, "restart", "--heartbeat", "3") for _ in range(2)]
    _running_trial(postgres.url, "restart")
    postgres.restart()
    _wait_all(workers)
    _assert_exactly_once(postgres.url, "restart")


LOCAL_AXES = ["--segments", "1,4,all", "--seeds", "0,1", "--epochs", "4", "--width", "0.25", "--train-size", "256",
              "--val-size", "128"]
"""6 small grid points x seeds (a quarter-width net): enough for one to die mid-trial while another has completed."""


@pytest.mark.slow
def test_local_workers_share_a_journal_file_and_survive_a_killed_worker(tmp_path):
    command = [sys.executable, "-m", "continuum.sweep", "--dataset", "synthetic", "--batch-size", "32", "--quiet",
               "--out", str(tmp_path), "--workers", "2", *LOCAL_AXES]
    parent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = tmp_path / "default" / "study.journal"
    deadline = time.time() + 120
    while not journal.exists() and time.time() < deadline:
        time.sleep(0.2)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    victim, _ = _kill_worker_mid_trial(storage, "default")
    _, stderr = parent.communicate(timeout=420)
    assert parent.returncode == 0, stderr
    assert "2 workers on journal:" in stderr
    _assert_exactly_once(storage, "default", points=6)
    assert not (tmp_path / "default" / "study.db").exists()
    trials = results.load(tmp_path / "default")
    assert "exited with code -9" in trials.loc[trials["trial"] == victim.number, "fail_reason"].item()


def test_tuning_before_the_workers_waits_only_for_calls_that_come_again(tmp_path, monkeypatch, caplog):
    from continuum import strategy
    from continuum.cost import layer_costs
    from continuum.data import make_synthetic
    from continuum.strategy import TUNER
    from continuum.sweep import workers
    from continuum.sweep.points import build_model, grid_points
    from continuum.sweep.settings import from_settings
    from continuum.train import tune_kernels
    cfg = from_settings({"dataset": "synthetic", "width": 0.25, "segments": "1", "workers": 2, "batch_size": 16,
                         "device": "cpu"})  # tuning before the workers is for the CPU's shared cores
    data = make_synthetic(train_size=32, val_size=16)
    points = list(grid_points(cfg))
    monkeypatch.setenv("CONTINUUM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(TUNER, "busy_reason", lambda *args, **kwargs: None)
    tunings = []
    monkeypatch.setattr(workers, "tune_kernels", lambda *args: tunings.append(args) or tune_kernels(*args))
    TUNER.forget()
    try:  # a call found busy in the parent at its own thread count (a width matched to a budget): never met again
        TUNER.retry_at[("a call at another thread count",)] = time.monotonic() - 1
        workers.tune_for_workers(cfg, data, [point.config for point in points], progress=False)
        assert len(tunings) == 1 and strategy.next_retry_s() == 0.0  # tuned once, the other call left waiting
        monkeypatch.setattr(TUNER, "_tuned", lambda *args: pytest.fail("counting a model's cost tuned a conv"))
        layer_costs(build_model(points[0].config, data), (1, 28, 28))
    finally:
        TUNER.forget()
    assert "stayed busy" not in caplog.text


def test_tuning_before_the_workers_builds_each_model_at_the_width_its_trials_train(monkeypatch):
    from continuum.data import make_synthetic
    from continuum.sweep import workers
    from continuum.sweep.points import build_model, grid_points, matched
    from continuum.sweep.settings import from_settings
    data = make_synthetic(train_size=32, val_size=16)
    plain = {"dataset": "synthetic", "width": 0.25, "segments": "1,all", "workers": 2, "batch_size": 16,
             "device": "cpu"}
    budget = sum(p.numel() for p in build_model(next(grid_points(from_settings(plain))).config, data).parameters())
    cfg = from_settings({key: value for key, value in plain.items() if key != "width"}
                        | {"match_params": budget, "seeds": "0,1"})
    points = list(grid_points(cfg))  # each model twice: once per seed
    models = [points[0].config, points[2].config]
    assert [point.config for point in points] == [models[0], models[0], models[1], models[1]]
    tuned = []
    monkeypatch.setattr(workers, "tune_kernels", lambda model, *args: tuned.append(model))
    monkeypatch.setattr(workers, "next_retry_s", lambda *args: None)
    workers.tune_for_workers(cfg, data, [point.config for point in points], progress=False)
    widths = [matched(config, cfg, data).width for config in models]
    assert widths[0] != 1.0 and widths[1] > widths[0]  # depthwise needs more channels for the same parameters
    assert [[p.shape for p in model.parameters()] for model in tuned] == \
        [[p.shape for p in build_model(matched(config, cfg, data), data).parameters()] for config in models]


def test_a_sqlite_study_moves_to_a_journal_for_parallel_workers_that_train_on_kernels_tuned_before(
        tmp_path, monkeypatch, caplog):
    from continuum import strategy
    from continuum.strategy import TUNER
    from continuum.sweep.cli import main
    from continuum.sweep.workers import worker_threads
    from conftest import FAST
    cpu = [*FAST, "--device", "cpu"]  # tuning before the workers is for the CPU's shared cores
    assert main([*cpu, "--out", str(tmp_path), "--segments", "1"]) == 0
    monkeypatch.setenv("CONTINUUM_CACHE", str(tmp_path / "cache"))
    busy = iter(["another job ran"])  # the first tuning finds the machine busy, later ones quiet
    monkeypatch.setattr(TUNER, "busy_reason", lambda *args, **kwargs: next(busy, None))  # xdist's other tests, too
    monkeypatch.setattr(strategy, "RETRY_SECONDS", 0.5)
    TUNER.forget()
    try:
        assert main([*cpu, "--out", str(tmp_path), "--segments", "1,all", "--workers", "2"]) == 0
        assert strategy.next_retry_s() is None  # the conv found busy was tuned once the machine was quiet
    finally:
        TUNER.forget()
    assert "tuning the conv kernels of 1 model(s) of default before" in caplog.text  # segments 1 is done
    assert "not tuned while the machine is busy (another job ran)" in caplog.text and "stayed busy" not in caplog.text
    cached = json.loads((tmp_path / "cache" / "conv_strategies.json").read_text())
    threads = f"x{worker_threads(2)} threads"
    passes = {key.rsplit("|", 1)[1] for key in cached if threads in key and "|cl/" in key}
    assert {"fwd+bwd", "fwd"} <= passes  # the training step's and the validation's shapes, at a worker's threads
    folder = tmp_path / "default"
    assert (folder / "study.journal").exists() and (folder / "study.db.moved").exists()
    trials = results.load(folder)
    assert sorted(trials["segments"]) == ["1", "all"] and trials["trial"].is_unique
    assert main([*cpu, "--out", str(tmp_path), "--segments", "1,all"]) == 0  # later runs use the journal
    assert len(results.load(folder)) == 2


def test_each_local_worker_draws_its_own_configurations():
    from continuum.sweep.settings import from_settings
    from continuum.sweep.study import _sampler, sampler_seed
    cfg = from_settings({"search": "tpe", "n_trials": 4, "out": "/tmp"})
    assert len({sampler_seed(cfg, worker) for worker in range(4)}) == 4
    assert sampler_seed(cfg, None) == sampler_seed(cfg, 0) == sampler_seed(cfg, 0)  # one process reproduces
    assert sampler_seed(cfg, 0, drawn=4) != sampler_seed(cfg, 0)  # a resumed search draws new points
    draws = []
    for worker in (1, 2):
        study = optuna.create_study(sampler=_sampler(cfg, worker))
        draws.append([study.ask().suggest_float("width", 0.5, 1.5) for _ in range(3)])
    assert draws[0] != draws[1]

