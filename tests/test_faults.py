"""Faults: a sweep killed (SIGKILL) or stopped (SIGTERM) mid-trial on each storage, storages emptied, truncated or
garbled, workers racing to create a database, full and read-only disks. Each loses at most the trial in progress,
never hangs, and never overwrites what a study already holds."""

import hashlib
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal._file import get_lock_file

from continuum import results
from continuum.sweep.cli import main
from continuum.sweep.points import DUPLICATE
from continuum.sweep.settings import from_settings
from continuum.sweep.storage import journal_backend, open_storage
from conftest import FAST

AXES = ["--segments", "1,all", "--epochs", "4", "--width", "0.25", "--train-size", "256", "--val-size", "128"]
"""Two grid points of four short epochs (a quarter-width net): time to stop one mid-trial."""


def _spawn(out: Path, storage: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "continuum.sweep", "--dataset", "synthetic", "--quiet", "--batch-size", "32",
               "--out", str(out), "--storage", storage, "--heartbeat", "1", *AXES, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})


def _trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name="default", storage=open_storage(storage, 1)).get_trials(deepcopy=False)
    except (KeyError, ValueError):  # not created yet
        return []


def _wait_for_a_snapshot(folder: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(folder.glob("snapshots/*.pt")):
            return
        time.sleep(0.05)
    raise AssertionError("no trial saved its training state in time")


def _file_storages(tmp_path: Path) -> dict[str, str]:
    return {"sqlite": f"sqlite:///{tmp_path / 'study.db'}", "journal": f"journal:{tmp_path / 'study.journal'}"}


@pytest.mark.parametrize("kind, stop", [
    ("journal", signal.SIGKILL),
    pytest.param("journal", signal.SIGTERM, marks=pytest.mark.slow),
    pytest.param("sqlite", signal.SIGTERM, marks=pytest.mark.slow),  # SIGKILL on SQLite: test_sweep.py (slow)
    pytest.param("postgres", signal.SIGKILL, marks=pytest.mark.slow),
    pytest.param("postgres", signal.SIGTERM, marks=pytest.mark.slow),
])
def test_a_stopped_sweep_loses_only_its_running_trial_and_a_rerun_finishes(tmp_path, request, kind, stop):
    storage = _file_storages(tmp_path).get(kind) or _fresh_database(request.getfixturevalue("postgres"))
    process = _spawn(tmp_path, storage)
    _wait_for_a_snapshot(tmp_path / "default")
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)
    if stop == signal.SIGTERM:  # stopped as by Ctrl-C: the trial is marked, the tables are written
        assert process.returncode == 130 and "rerun the same command to resume" in stderr
        assert "interrupted" in set(results.load(tmp_path / "default")["fail_reason"].dropna())
    else:  # killed: its trial goes stale after 3 silent heartbeats, and the rerun finds it so
        time.sleep(3)
    rerun = _spawn(tmp_path, storage)
    assert rerun.wait(timeout=240) == 0, rerun.stderr.read()
    trials = _trials(storage)
    complete = [t.user_attrs["point"] for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2 and len(set(complete)) == 2
    # the stopped point ran first, ahead of the point still queued, whose queued trial then stood down
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].user_attrs["fail_reason"].startswith(DUPLICATE)
    table = results.load(tmp_path / "default")
    assert len(table) == 3 and table["trial"].is_unique
    resumed = table[table["resumed_epochs"] > 0]  # the stopped point went on from its last saved epoch
    assert len(resumed) == 1 and resumed["state"].item() == "COMPLETE" and resumed["epochs_done"].item() == 4
    assert resumed["trial"].item() == 1 and trials[1].user_attrs["point"] == trials[0].user_attrs["point"]
    assert not (tmp_path / "default" / "snapshots").exists()


@pytest.mark.slow  # three processes loading torch: the stop itself is in test_train.py's default run
def test_sigusr1_stops_each_worker_after_its_epoch_in_progress_and_the_rerun_loses_nothing(tmp_path):
    storage = _file_storages(tmp_path)["journal"]
    # the parent passes the signal on to both workers; epochs of 1-2 s (not 0.3) outlast its way there
    longer_epochs = ["--train-size", "2048"]
    process = _spawn(tmp_path, storage, "--workers", "2", *longer_epochs)
    _wait_for_a_snapshot(tmp_path / "default")
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "stopped after the epoch in progress, which is saved" in stderr, stderr
    stopped = results.load(tmp_path / "default")
    assert "RUNNING" not in set(stopped["state"]) and "lost" not in stderr
    stopped = stopped[stopped["fail_reason"] == "interrupted"].set_index("segments")["epochs_done"]
    assert len(stopped) >= 1 and stopped.between(1, 3).all()  # each stopped after a whole epoch, before the last
    rerun = _spawn(tmp_path, storage, *longer_epochs)
    assert rerun.wait(timeout=240) == 0, rerun.stderr.read()
    done = results.load(tmp_path / "default").query("state == 'COMPLETE'").set_index("segments")
    assert len(done) == 2 and (done.loc[stopped.index, "resumed_epochs"] == stopped).all()  # every epoch kept


SEARCH = ["--search", "nsga2", "--n-trials", "2", "--epochs", "2", "--segments", "1,all", "--seeds", "0,1"]
"""A search of two trials of two epochs, cycling two seeds: a stop after the first epoch of its first trial."""


def test_a_stopped_search_trial_reruns_its_point_from_its_saved_epochs_before_drawing_new_ones(tmp_path, monkeypatch):
    from continuum.sweep import objective
    storage = _file_storages(tmp_path)["journal"]
    args = [*FAST, "--out", str(tmp_path), "--storage", storage, *SEARCH]
    stops = iter([True])  # SIGUSR1 during the first epoch: the trial stops once that epoch is saved
    monkeypatch.setattr(objective, "stop_requested", lambda: next(stops, False))
    assert main(args) == 130
    stopped = _trials(storage)
    assert [t.state.name for t in stopped] == ["FAIL"] and stopped[0].user_attrs["fail_reason"] == "interrupted"
    assert len(list((tmp_path / "default" / "snapshots").glob("*.pt"))) == 1
    assert main(args) == 0
    trials = _trials(storage)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]  # 2 trials done, none drawn twice
    rerun = trials[1]
    assert rerun.system_attrs["failed_trial"] == 0  # queued as Optuna retries a stale trial
    assert rerun.params == stopped[0].params and rerun.user_attrs["point"] == stopped[0].user_attrs["point"]
    table = results.load(tmp_path / "default").set_index("trial")
    assert table.loc[1, "seed"] == 0 and table.loc[2, "seed"] == 0  # the rerun keeps its point's seed: not 1 % 2
    assert table.loc[1, "resumed_epochs"] == 1 and table.loc[1, "epochs_done"] == 2
    assert not (tmp_path / "default" / "snapshots").exists()


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_search_point_queued_again_twice_runs_once(tmp_path, monkeypatch):
    """Two workers queueing the same interrupted point at once: the later copy stands down as a duplicate."""
    from continuum.sweep import objective
    storage = _file_storages(tmp_path)["journal"]
    args = [*FAST, "--out", str(tmp_path), "--storage", storage, *SEARCH, "--n-trials", "1"]
    monkeypatch.setattr(objective, "stop_requested", lambda: True)
    assert main(args) == 130
    study = optuna.load_study(study_name="default", storage=open_storage(storage, 1))
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback()
    for _ in range(2):
        retry(study, study.trials[0])
    monkeypatch.setattr(objective, "stop_requested", lambda: False)
    assert main(args) == 0
    trials = _trials(storage)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "FAIL"]
    assert trials[2].user_attrs["fail_reason"] == f"{DUPLICATE}: trial 1 has this point"


def test_sigusr1_that_reaches_workers_before_their_handlers_stops_them_quietly(tmp_path, monkeypatch, caplog):
    """The parent passes SIGUSR1 on the moment it has it; workers still importing torch die of the signal itself.
    They had no trial: nothing is failed, nothing is reported lost, and the sweep stops as asked."""
    from continuum.strategy import conv_strategy
    from continuum.sweep import workers
    monkeypatch.setattr(workers, "wait_for_stop", lambda seconds: True)  # SIGUSR1 at once, as the workers start
    monkeypatch.setattr(workers, "stop_requested", lambda: True)
    storage = _file_storages(tmp_path)["journal"]
    with conv_strategy("native"):
        code = main([*FAST, "--out", str(tmp_path), "--segments", "1,all", "--workers", "2", "--storage", storage])
    assert code == 130 and "exited with code" not in caplog.text
    assert {t.state.name for t in _trials(storage)} <= {"WAITING"}  # the queued points, none started or failed


def _fresh_database(server) -> str:
    """A new, empty database on the test server."""
    import sqlalchemy
    name = f"db_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(server.url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return server.url.rsplit("/", 1)[0] + f"/{name}"


def _open_at_once(url: str, out: Path, barrier, errors) -> None:
    try:
        barrier.wait()
        from continuum.sweep.study import connect
        connect(from_settings({"storage": url, "out": str(out), "segments": "1"}), worker=None)
    except BaseException as err:  # noqa: BLE001  (reported to the test)
        errors.put(f"{type(err).__name__}: {err}")


def test_workers_started_at_the_same_instant_on_an_empty_database_all_open_it(postgres, tmp_path):
    url = _fresh_database(postgres)
    context = multiprocessing.get_context("fork")
    barrier, errors = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_open_at_once, args=(url, tmp_path, barrier, errors)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    assert errors.empty(), errors.get()
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["default"]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished one-point study on SQLite and one on a journal file."""
    root = tmp_path_factory.mktemp("finished")
    assert main([*FAST, "--out", str(root), "--segments", "1"]) == 0
    assert main([*FAST, "--out", str(root), "--segments", "1", "--study", "journal", "--storage",
                 f"journal:{root / 'journal' / 'study.journal'}"]) == 0
    return root


@pytest.mark.parametrize("study, damage, message", [
    ("default", lambda f: (f / "study.db").write_bytes(b""), "the storage was emptied or is another one"),
    ("default", lambda f: (f / "study.db").unlink() or optuna.create_study(storage=f"sqlite:///{f / 'study.db'}",
                                                                           study_name="other"),
     "the storage was emptied or is another one"),
    ("default", lambda f: (f / "study.db").write_bytes(b"not a database" * 100), "file is not a database"),
    ("journal", lambda f: (f / "study.journal").write_bytes(b""), "the storage was emptied or is another one"),
    ("journal", lambda f: (f / "study.journal").write_bytes(b"garbage\n{not json\n"), "not an Optuna journal file"),
])
def test_a_lost_emptied_or_garbled_storage_is_refused_and_the_tables_kept(finished, tmp_path, capsys, study, damage,
                                                                          message):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    folder = tmp_path / study
    damage(folder)
    before = _digest(folder)
    storage = ["--storage", f"journal:{folder / 'study.journal'}"] if study == "journal" else []
    capsys.readouterr()
    assert main([*FAST, "--out", str(tmp_path), "--segments", "1", "--study", study, *storage]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert _digest(folder) == before


def test_tables_without_their_storage_start_a_new_study_with_a_warning(finished, tmp_path, caplog):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)  # as a fresh clone has them: tables, no database
    (tmp_path / "default" / "study.db").unlink()
    assert main([*FAST, "--out", str(tmp_path), "--segments", "4"]) == 0
    assert "a new study starts, and its tables replace them" in caplog.text
    assert list(results.load(tmp_path / "default")["segments"]) == ["4"]


def test_a_half_written_journal_record_is_cut_off_and_the_study_goes_on(finished, tmp_path):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    journal = tmp_path / "journal" / "study.journal"
    with open(journal, "ab") as handle:  # a writer killed in the middle of a record
        handle.write(b'{"op_code": 4, "worker_id": "dead", "study_id": 0, "datetime_st')
    args = [*FAST, "--out", str(tmp_path), "--study", "journal", "--storage", f"journal:{journal}"]
    assert main([*args, "--segments", "1,all"]) == 0
    assert journal.read_bytes().endswith(b"\n") and b'"dead"' not in journal.read_bytes()
    trials = results.load(tmp_path / "journal")
    assert sorted(trials["segments"]) == ["1", "all"] and set(trials["state"]) == {"COMPLETE"}


def test_a_journal_lock_left_by_a_killed_writer_does_not_hang_the_rerun(finished, tmp_path):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    journal = Path("journal") / "study.journal"  # relative to the results root, as experiment files name it
    lock = tmp_path / f"{journal}.lock"
    os.symlink(journal, lock)  # what a writer killed while holding the lock leaves: a link to the relative path
    os.utime(lock, (time.time() - 120,) * 2, follow_symlinks=False)
    rerun = subprocess.run([sys.executable, "-m", "continuum.sweep", *FAST, "--out", ".", "--study", "journal",
                            "--storage", f"journal:{journal}", "--segments", "1,all"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert not lock.is_symlink() and "removed the lock" in rerun.stderr
    assert sorted(results.load(tmp_path / "journal")["segments"]) == ["1", "all"]
    with get_lock_file(journal_backend(tmp_path / "journal" / "study.journal")._lock):
        assert Path(os.readlink(lock)).is_absolute()  # a later killed writer's lock: Optuna's grace period breaks it


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 160 KiB tmpfs (root only): room for a study's database and one trial's tables, not for three."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk))
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_stops_the_sweep_in_one_line_and_a_rerun_with_space_finishes(small_disk, capsys):
    args = [*FAST, "--out", str(small_disk), "--segments", "1,4,all"]
    started = time.monotonic()
    assert main(args) == 1
    assert time.monotonic() - started < 60  # no minutes of retrying a disk that stays full
    err = capsys.readouterr().err
    assert "No space left on device" in err and "rerun the same command to resume" in err
    assert err.count("\n") == 1
    _mount("-o", "remount,size=4m", str(small_disk))
    assert main(args) == 0
    folder = small_disk / "default"
    trials = results.load(folder)
    assert len(trials) == 3 and set(trials["state"]) == {"COMPLETE"}
    assert not list(folder.glob(".*.tmp"))


@pytest.fixture
def read_only_copy(finished, tmp_path):
    """A read-only bind mount (root only) of a finished study's results root."""
    copy, view = tmp_path / "copy", tmp_path / "view"
    shutil.copytree(finished, copy)
    view.mkdir()
    try:
        _mount("--bind", str(copy), str(view))
        _mount("-o", "remount,bind,ro", str(view))
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("bind mounts need root")
    yield view
    subprocess.run(["umount", "-l", str(view)], check=False)


@pytest.mark.parametrize("study, message", [
    ("default", "is read-only; use --out with a writable folder"),  # the finished study, rerun
    ("fresh", "is read-only; use --out with a writable folder"),  # a new study in a read-only root
])
def test_a_read_only_results_folder_is_refused_before_anything_runs(read_only_copy, capsys, study, message):
    before = {path: _digest(path) for path in read_only_copy.iterdir() if path.is_dir()}
    capsys.readouterr()
    assert main([*FAST, "--out", str(read_only_copy), "--segments", "1,all", "--study", study]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert {path: _digest(path) for path in read_only_copy.iterdir() if path.is_dir()} == before


def test_tables_and_plots_get_the_usual_file_mode_and_killed_writes_leave_no_temp_files(finished, tmp_path):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    folder = tmp_path / "default"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = folder / f".trials.csv.{socket.gethostname()}.{dead.stdout.strip()}.abc123.tmp"  # a killed writer's
    left.write_text("half a tab")
    old = folder / ".curves.csv.otherhost.12.xyz.tmp"  # one from another machine, an hour ago
    old.write_text("half a tab")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    live = folder / f".summary.md.{socket.gethostname()}.{os.getpid()}.live.tmp"  # a writer still at work
    live.write_text("being written")
    umask = os.umask(0o022)
    try:
        assert main([*FAST, "--out", str(tmp_path), "--segments", "1,all"]) == 0
    finally:
        os.umask(umask)
    assert not left.exists() and not old.exists() and live.exists()
    live.unlink()
    modes = {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir() if path.suffix in (".csv", ".png",
                                                                                                     ".md")}
    assert set(modes.values()) == {0o644}, modes


def test_a_worker_whose_trial_another_failed_goes_on_and_the_point_reruns(tmp_path, monkeypatch):
    """A worker paused or suspended past its heartbeat's grace finds its trial failed by another on waking: it logs
    that and goes on (it used to stop with a traceback), and the point reruns."""
    from continuum.sweep import objective
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    fit, calls = objective.fit, []

    def fail_from_outside_then_fit(*args, **kwargs):
        if not calls:  # the first trial: another worker fails it as stale once its first epoch is done
            on_epoch = args[4]

            def epoch_then_failed(metrics):
                on_epoch(metrics)
                study = optuna.load_study(study_name="default", storage=storage)
                running = study.get_trials(states=[optuna.trial.TrialState.RUNNING])[0]
                study._storage.set_trial_state_values(running._trial_id, optuna.trial.TrialState.FAIL)
            args = (*args[:4], epoch_then_failed, *args[5:])
        calls.append(1)
        return fit(*args, **kwargs)

    monkeypatch.setattr(objective, "fit", fail_from_outside_then_fit)
    assert main([*FAST, "--out", str(tmp_path), "--segments", "1", "--epochs", "2", "--storage", storage]) == 0
    states = [t.state.name for t in optuna.load_study(study_name="default", storage=storage).get_trials()]
    assert states == ["FAIL", "COMPLETE"] and len(calls) == 2


def test_a_trial_out_of_gpu_memory_fails_naming_the_fix_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """CUDA's out-of-memory error (raised here without a GPU) fails that trial alone, with the batch size to lower."""
    import torch

    from continuum.sweep import objective
    fit, calls = objective.fit, []

    def out_of_memory_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return fit(*args, **kwargs)

    monkeypatch.setattr(objective, "fit", out_of_memory_first)
    assert main([*FAST, "--out", str(tmp_path), "--segments", "1,all"]) == 0
    trials = results.load(tmp_path / "default").set_index("segments")
    assert list(trials["state"]) == ["FAIL", "COMPLETE"] and len(calls) == 2
    assert trials.loc["1", "fail_reason"] == "CUDA out of memory at batch size 64; lower --batch-size"
    assert "lower --batch-size" in (tmp_path / "default" / "summary.md").read_text()
    assert main([*FAST, "--out", str(tmp_path), "--segments", "1,all"]) == 0  # a lasting reason: not run again
    assert len(calls) == 2
