"""The results tables are kept current incrementally: each update converts only new or running trials, and the
files equal the tables rebuilt from every trial."""

import optuna
import pandas as pd

from continuum import results
from continuum.config import ModelConfig
from continuum.sweep import tables as tables_module
from continuum.sweep.record import record
from continuum.sweep.tables import StudyTables


def add_trial(study: optuna.Study, segments, state: str = "complete", reason: str | None = None):
    trial = study.ask()
    trial.set_user_attr("config", ModelConfig(segments=segments).validate().to_dict() | {"seed": 0})
    trial.set_user_attr("curve", [{"epoch": 1, "val_acc": 0.5, "val_loss": 1.0, "lr": 0.1, "seconds": 1.5},
                                  {"epoch": 2, "val_acc": 0.6, "val_loss": 0.9, "lr": 0.05, "seconds": 1.5}])
    record(trial, val_acc=0.6, params=1234, fail_reason=reason, device='cpu "quoted", with commas\nand a newline')
    if state == "complete":
        study.tell(trial, 0.6)
    elif state == "fail":
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return trial


def as_written(frame: pd.DataFrame, path, kind: str) -> pd.DataFrame:
    """``frame`` as pandas writes it to CSV and continuum reads it back."""
    frame.to_csv(path, index=False)
    return results.read_table(path, kind)


def test_tables_equal_a_rebuild_and_convert_each_finished_trial_once(tmp_path, monkeypatch):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize")
    converted = []
    real = tables_module.trial_rows
    monkeypatch.setattr(tables_module, "trial_rows", lambda trial: converted.append(trial.number) or real(trial))
    tables = StudyTables(study, tmp_path)
    add_trial(study, 1)
    add_trial(study, "all", "fail", "non-finite loss")
    running = add_trial(study, 4, "running")
    study.ask()  # a trial that recorded nothing yet
    tables.update()
    tables.write()
    assert sorted(converted) == [0, 1, 2, 3]
    for kind, rebuilt in (("trials", results.load(study)), ("curves", results.load(study, curves=True))):
        written = results.read_table(tmp_path / f"{kind}.csv", kind)
        pd.testing.assert_frame_equal(written, as_written(rebuilt, tmp_path / "rebuilt.csv", kind))
    assert list(tables.trials()["state"]) == ["COMPLETE", "FAIL", "RUNNING"]

    converted.clear()
    study.tell(running, 0.7)
    add_trial(study, 16)
    tables.update()
    tables.write()
    assert sorted(converted) == [2, 3, 4]  # the finished trials 0 and 1 are not converted again
    written = results.read_table(tmp_path / "trials.csv", "trials")
    assert list(written["state"]) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    pd.testing.assert_frame_equal(written, as_written(results.load(study), tmp_path / "rebuilt.csv", "trials"))
