"""Packaging: the ``continuum`` console script and its subcommands, dependency bounds that hold for what is
installed and what the code uses, and the private Optuna APIs the storages build on."""

import importlib.metadata
import inspect
import subprocess
import sys

import optuna
import pytest
import scipy.stats
from packaging.requirements import Requirement

from continuum import cli
from continuum.sweep import storage


def test_the_console_script_is_declared_and_runs_each_command(capsys):
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="continuum")
    assert script.load() is cli.main
    shown = subprocess.run([sys.executable, "-m", "continuum", "sweep", "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: continuum sweep "), shown.stderr
    for command in cli.COMMANDS:
        with pytest.raises(SystemExit) as stop:
            cli.main([command, "--help"])
        assert stop.value.code == 0 and capsys.readouterr().out.startswith(f"usage: continuum {command} ")


def test_the_console_script_refuses_an_unknown_command_and_keeps_each_commands_exit_code(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["train"])
    assert stop.value.code == 2 and "invalid choice: 'train'" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "no results table" in capsys.readouterr().err


def test_installed_versions_meet_the_declared_bounds():
    for text in importlib.metadata.requires("continuum"):
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        installed = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), f"{requirement}: {installed} installed"


def test_the_bounds_cover_what_the_code_uses():
    bounds = {Requirement(text).name: Requirement(text).specifier for text in importlib.metadata.requires("continuum")}
    assert "rng" in inspect.signature(scipy.stats.bootstrap).parameters  # analysis.bootstrap_interval
    assert not bounds["scipy"].contains("1.14.1")  # bootstrap(rng=) came in SciPy 1.15
    assert not bounds["optuna"].contains("6.0.0")  # a new major version may drop the private APIs below
    assert "pyarrow" in bounds  # trials.parquet is written by default (continuum report)


def test_the_private_optuna_apis_the_storages_wrap_still_exist(tmp_path):
    rdb = optuna.storages.RDBStorage
    missing = [name for name in storage._RETRIED if not callable(getattr(rdb, name, None))]
    assert not missing, f"RDBStorage lost {missing}: ReconnectingRDBStorage must follow Optuna {optuna.__version__}"
    assert "_get_stale_trial_ids" in inspect.getsource(optuna.storages.fail_stale_trials)
    assert callable(getattr(optuna.storages._heartbeat.BaseHeartbeat, "_get_stale_trial_ids", None))
    backend = optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.journal"))
    assert hasattr(backend, "_lock") and callable(optuna.storages.journal._file.get_lock_file)
