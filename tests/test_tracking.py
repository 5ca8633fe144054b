"""Trackers and checkpoints: TensorBoard and MLflow runs per trial, a user's own tracker, bad tracker names, and
saved models that rebuild exactly."""

import sys
import textwrap

import pytest
import torch

from continuum import results
from continuum.sweep.cli import main
from conftest import FAST


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A two-point, two-epoch sweep logged to TensorBoard, MLflow and a tracker of the test's own, saving models."""
    out = tmp_path_factory.mktemp("tracked")
    (out / "my_tracker.py").write_text(textwrap.dedent('''
        import json
        from continuum.tracking import Tracker

        class Recorder(Tracker):
            def start_trial(self, trial, hparams, folder):
                self.file = open(folder / f"calls_{trial}.jsonl", "w")
                self.write("start", trial=trial, hparams=hparams)
            def log_epoch(self, epoch, metrics):
                self.write("epoch", epoch=epoch, val_acc=metrics["val_acc"])
            def end_trial(self, state, metrics):
                self.write("end", state=state, val_acc=metrics["val_acc"], params=metrics["params"])
                self.file.close()
            def write(self, call, **values):
                self.file.write(json.dumps({"call": call, **values}) + "\\n")
        '''))
    sys.path.insert(0, str(out))
    try:
        args = [*FAST, "--epochs", "2", "--out", str(out), "--segments", "1,all", "--save-models",
                "--tracker", "tensorboard,mlflow,my_tracker:Recorder"]
        assert main(args) == 0
    finally:
        sys.path.remove(str(out))
    return out / "default"


def test_a_users_tracker_is_called_for_every_trial_and_epoch(tracked):
    import json
    trials = results.load(tracked)
    for row in trials.itertuples():
        calls = [json.loads(line) for line in (tracked / f"calls_{row.trial}.jsonl").read_text().splitlines()]
        assert [c["call"] for c in calls] == ["start", "epoch", "epoch", "end"]
        assert calls[0]["hparams"]["segments"] == row.segments and calls[0]["hparams"]["epochs"] == 2
        assert calls[-1] == {"call": "end", "state": "COMPLETE", "val_acc": row.val_acc, "params": row.params}


def test_tensorboard_gets_scalars_per_epoch_and_the_hparams_view(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    runs = sorted((tracked / "tensorboard").iterdir())
    assert [run.name for run in runs] == ["trial_0000", "trial_0001"]
    events = EventAccumulator(str(runs[1])).Reload()
    assert [e.step for e in events.Scalars("val_acc")] == [1, 2]
    for tag in ("train_loss", "val_loss", "epoch_lr", "images_per_s", "final/val_acc", "final/latency_ms"):
        assert tag in events.Tags()["scalars"], tag
    plugins = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins and b"segments" in plugins["_hparams_/session_start_info"]


def test_mlflow_gets_one_run_per_trial(tracked, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=(tracked / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("default")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])
    assert [run.info.run_name for run in runs] == ["trial 0", "trial 1"]
    assert {run.data.params["segments"] for run in runs} == {"1", "all"}
    assert all(run.info.status == "FINISHED" for run in runs)
    history = client.get_metric_history(runs[0].info.run_id, "val_acc")
    assert [m.step for m in history] == [1, 2]


def test_saved_models_rebuild_exactly(tracked):
    trials = results.load(tracked)
    for row in trials.itertuples():
        model = results.load_model(tracked, trial=row.trial)
        assert sum(p.numel() for p in model.parameters()) == row.params
    by_config = results.load_model(tracked, segments="all", seed=0)
    same = results.load_model(tracked, trial=int(trials.loc[trials["segments"] == "all", "trial"].iloc[0]))
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(by_config(x), same(x))
    assert not by_config.training
    with pytest.raises(ValueError, match="2 trials match"):
        results.load_model(tracked, seed=0)
    with pytest.raises(ValueError, match="no completed trial"):
        results.load_model(tracked, segments="7")


@pytest.mark.parametrize("tracker,message", [
    ("wandb", "not valid; use tensorboard, mlflow or module:Class"),
    ("no_such_module:Tracker", "cannot import it"),
    ("continuum.tracking:scalars", "not a subclass of continuum.tracking.Tracker"),
])
def test_bad_tracker_names_are_refused_before_anything_is_written(tmp_path, capsys, tracker, message):
    assert main([*FAST, "--out", str(tmp_path), "--tracker", tracker]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "default").exists()
