"""optuna-dashboard shows a sweep as it is: objectives named, per-epoch values, and each grid point's knobs as
parameters (plots and tables use them), also after the grid grows on a rerun. The page test opens a real
optuna-dashboard in headless Chromium."""

import importlib.util
import shutil
from pathlib import Path

import optuna
import pytest

from continuum.sweep.cli import main
from continuum.sweep.points import SEGMENTS_ALL
from conftest import FAST

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grid_study(tmp_path_factory) -> Path:
    """A two-epoch grid over segments, then grown by one segment count on a rerun."""
    out = tmp_path_factory.mktemp("dashboard")
    args = [*FAST, "--epochs", "2", "--out", str(out)]
    assert main([*args, "--segments", "1,all"]) == 0
    assert main([*args, "--segments", "1,4,all"]) == 0  # the grid grows: its params must stay compatible
    return out / "default" / "study.db"


def test_grid_trials_carry_their_knobs_metric_names_and_epochs(grid_study):
    study = optuna.load_study(study_name="default", storage=f"sqlite:///{grid_study}")
    assert study.metric_names == ["val_acc"]
    trials = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert sorted(t.params["segments"] for t in trials) == [1, 4, SEGMENTS_ALL]
    for trial in trials:
        assert set(trial.params) == {"segments"}  # the knob the grid varies; constant ones would be noise
        config = trial.user_attrs["config"]
        assert trial.params["segments"] == (SEGMENTS_ALL if config["segments"] == "all" else config["segments"])
        assert sorted(trial.intermediate_values) == [1, 2]
        assert trial.intermediate_values[2] == trial.value


@pytest.mark.slow
def test_optuna_dashboard_shows_the_trials_knobs_and_metric_names(grid_study, tmp_path):
    pytest.importorskip("optuna_dashboard", reason="pip install optuna-dashboard")
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("Chromium absent: apt-get install chromium")
    spec = importlib.util.spec_from_file_location("dashboard_screenshot", ROOT / "examples/dashboard_screenshot.py")
    screenshot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshot)
    pages = screenshot.capture(f"sqlite:///{grid_study}", tmp_path / "dashboard.png")
    assert "3 Trials" in pages["trials"]
    for text in ("segments", "depthwise_first", "continuum_small"):
        assert text in pages["trials"], text
    assert "val_acc" in pages["study"] and "segments" in pages["study"]
    assert (tmp_path / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
