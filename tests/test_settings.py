"""Each setting is declared once: flags, experiment files, validation, grid axes and table columns derive from it."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from continuum.config import DataConfig, ModelConfig, TrainConfig
from continuum.sweep.cli import build_parser
from continuum.sweep.points import GridPoint, grid_points, point_key
from continuum.sweep.record import CURVE_COLUMNS, POINT_COLUMNS, TRIAL_COLUMNS, TrialRecord, record
from continuum.sweep.settings import SweepConfig, axis_fields, from_settings, read_experiment, setting_fields
from continuum.sweep.study import storage_url
from continuum.train import EpochMetrics


def test_every_setting_has_one_flag_with_its_help_and_default():
    help_text = " ".join(build_parser().format_help().split())
    for _, field in setting_fields():
        flag = "--" + (field.metadata["flag"] or field.name).replace("_", "-")
        assert flag in help_text, flag
        assert " ".join(field.metadata["help"].split()).replace("%%", "%") in help_text
    assert "--recipe VALUE training recipe (paper_sgd: 0.045 x0.94 per 2 epochs, scaled): cosine, paper_sgd, " \
           "paper_rmsprop (default: cosine)" in help_text
    assert "--segments LIST segment counts: ints and/or all (default: 1,4,16,all)" in help_text
    assert "--residual LIST shortcuts: on and/or off (default: on)" in help_text


def test_flags_files_and_field_names_give_the_same_config(tmp_path):
    experiment = tmp_path / "x.toml"
    experiment.write_text('order = ["depthwise_first", "pointwise_first"]\nmid_acts = ["none", "relu"]\n'
                          '[data]\ndataset = "synthetic"\n[train]\nbatch-size = 64\n')
    from_file = from_settings(read_experiment(experiment))
    from_flags = from_settings({"order": "depthwise_first,pointwise_first", "mid_act": "none,relu",
                                "dataset": "synthetic", "batch_size": "64"})
    assert from_file == from_flags
    assert from_file.train.batch_size == 64 and from_file.mid_acts == (None, "relu")
    assert SweepConfig.from_json(from_file.to_json()) == from_file


def test_numpy_numbers_are_numbers():
    config = from_settings({"epochs": np.int64(3), "seeds": [np.int32(0), np.uint8(2)], "batch_size": np.int16(8),
                            "weight_decay": np.float32(0.5), "width": np.int64(2)})
    assert config.train.epochs == 3 and config.seeds == (0, 2) and config.train.batch_size == 8
    assert all(type(v) is int for v in (config.train.epochs, *config.seeds, config.train.batch_size))
    assert config.train.weight_decay == 0.5 and type(config.train.weight_decay) is float
    with pytest.raises(ValueError, match="weight_decay=nan is not valid; use a finite number"):
        from_settings({"weight_decay": np.float32("nan")})


@pytest.mark.parametrize("settings, message", [
    ({"epochs": 2.5}, "epochs=2.5 is not valid; use a whole number"),
    ({"epochs": True}, "epochs=True is not valid; use a whole number"),
    ({"epochs": "0"}, "epochs=0 is not valid; use a whole number >= 1"),
    ({"train_size": -5}, "train_size=-5 is not valid; use a whole number >= 0"),
    ({"lr": "nan"}, "lr=nan is not valid; use learning rates > 0"),
    ({"lr": "0.1,0"}, "lr=0.0 is not valid; use learning rates > 0"),
    ({"lr": "0.1,0.1"}, "lr: 0.1 is listed twice"),
    ({"lr": "tuned"}, "lr=tuned takes each grid point's learning rate from a finished study"),
    ({"lr": "tuned,0.1", "lr_study": "x"}, "lr=tuned takes each grid point's learning rate"),
    ({"lr": "tuned", "lr_study": "default"}, "lr_study=default is this study"),
    ({"lr_study": "x"}, "lr_study is where --lr tuned reads the learning rates"),
    ({"lr": "0.1,0.2", "search": "tpe"}, "several learning rates are a grid axis"),
    ({"holdout": -1}, "holdout=-1 is not valid; use a whole number >= 0"),
    ({"warmup_epochs": "x"}, "warmup_epochs='x' is not valid; use a number"),
    ({"warmup_epochs": 3, "epochs": 3}, "warmup_epochs=3 is not valid; warm up for fewer epochs"),
    ({"width": "inf"}, "width=inf is not valid; use a finite number"),
    ({"width": "-1"}, "width=-1.0 is not valid; use 0 < value"),
    ({"recipe": "adam"}, "recipe='adam' is not valid; choose one of cosine, paper_sgd, paper_rmsprop"),
    ({"study": "a?b"}, r"study='a\?b' is not valid; use a plain name"),
    ({"seeds": "0,x"}, "seeds='x' is not valid; use whole numbers in 0..4294967295 such as 0,1,2"),
    ({"segments": "1,five"}, "segments='five' is not valid; use an int >= 1 or 'all'"),
    ({"residual": "maybe"}, "residual='maybe' is not valid; use on or off"),
    ({"segments": ""}, "segments: give at least one value"),
    ({"segments": "1,,2"}, "segments '1,,2' has an empty item; separate the values with single commas, such as 1,2"),
    ({"seeds": "0,1,"}, "seeds '0,1,' has an empty item"),
    ({"model": {"width": 2}}, r"\[model\] is not valid; model is a value, not a table \(tables: \[data\], \[train\]\)"),
    ({"train": [1, 2]}, r"train=\[1, 2\] is not valid; \[train\] is a table of settings"),
    ({"seeds": "0,4294967296"}, "seeds='4294967296' is not valid; use whole numbers in 0..4294967295"),
    ({"seeds": [-1]}, "seeds=-1 is not valid; use whole numbers in 0..4294967295"),
    ({"seeds": "0,1,0"}, "seeds: 0 is listed twice; give each value once"),
    ({"segments": "4,all,4"}, "segments: 4 is listed twice"),
    ({"data": {"epochs": 3}}, r"unknown setting\(s\) \['data.epochs'\]"),
    ({"colour": "red", "size": 1}, r"unknown setting\(s\) \['colour', 'size'\]"),
])
def test_bad_values_name_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        from_settings(settings)


def test_unreadable_experiment_files_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        read_experiment(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="cannot read it"):
        read_experiment(tmp_path)  # a folder
    (tmp_path / "latin1.toml").write_bytes(b'study = "caf\xe9"\n')
    with pytest.raises(ValueError, match="latin1.toml: cannot read it"):
        read_experiment(tmp_path / "latin1.toml")
    (tmp_path / "bad.toml").write_text("segments = [1,\n")
    with pytest.raises(ValueError, match="bad.toml: not valid TOML"):
        read_experiment(tmp_path / "bad.toml")


def test_grid_axes_are_the_model_configs_knobs_in_loop_order():
    assert [f.metadata["axis"] for f in axis_fields()] == [
        "model", "width", "depths", "residual", "mid_act", "order", "kernel_size", "segment_width", "segments", "lr",
        "seed"]
    knobs = {f.name for f in dataclasses.fields(ModelConfig)}
    assert {f.metadata["axis"] for f in axis_fields()} - {"seed", "lr"} <= knobs
    cfg = from_settings({"segments": "1,all", "order": "depthwise_first,pointwise_first", "seeds": "0,1"})
    points = list(grid_points(cfg))
    assert len(points) == 8 and len(set(map(repr, points))) == 8
    assert [(c.order, c.segments, s) for c, _, s in points[:3]] == [
        ("depthwise_first", 1, 0), ("depthwise_first", 1, 1), ("depthwise_first", "all", 0)]


def test_new_axes_read_the_same_from_flags_and_files_and_keep_old_point_keys(tmp_path):
    (tmp_path / "axes.toml").write_text('kernel-size = [3, 7]\nsegment-width = [8, 16]\ndepths = ["1/2/1", 2]\n'
                                        'match-flops = 30000000\n')
    from_file = from_settings(read_experiment(tmp_path / "axes.toml"))
    args = build_parser().parse_args(["--kernel-size", "3,7", "--segment-width", "8,16", "--depths", "1/2/1,2",
                                      "--match-flops", "30000000"])
    from_flags = from_settings({k: v for k, v in vars(args).items() if v is not None and k not in ("config", "quiet")})
    assert from_file == from_flags
    assert (from_file.kernel_sizes, from_file.segment_widths, from_file.depths) == ((3, 7), (8, 16), ((1, 2, 1), 2))
    assert from_file.segments == ("all",) and from_file.match_flops == 30_000_000
    points = [point.config for point in grid_points(from_file)]
    assert len(points) == 8 and {c.segments for c in points} == {None}
    # a point at the new knobs' defaults keeps the key it had before they existed
    assert point_key(GridPoint(ModelConfig(segments=4).validate(), None, 0)) == (
        '{"drop_rate": 0.0, "mid_act": null, "model": "continuum_small", "order": "depthwise_first", '
        '"residual": true, "seed": 0, "segments": 4, "width": 1.0, "width_divisor": null}')


def test_the_trial_record_is_the_table():
    assert TRIAL_COLUMNS[:2] == ["trial", "state"]
    assert POINT_COLUMNS == [f.name for f in dataclasses.fields(ModelConfig)] + ["lr", "seed"]
    assert TRIAL_COLUMNS == [f.name for f in dataclasses.fields(TrialRecord)]
    assert "worker" in TRIAL_COLUMNS and len(set(TRIAL_COLUMNS)) == len(TRIAL_COLUMNS)
    assert CURVE_COLUMNS == ["trial", *POINT_COLUMNS, *(f.name for f in dataclasses.fields(EpochMetrics))]


def test_configs_validate_from_their_field_parsers():
    assert TrainConfig(epochs="4", augment="off").validate() == TrainConfig(epochs=4, augment=False)
    with pytest.raises(ValueError, match="batch_size=0 is not valid; use a whole number >= 1"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="val_size='many' is not valid; use a whole number"):
        DataConfig(val_size="many").validate()


def test_only_columns_of_the_record_can_be_recorded():
    stored = {}

    class Trial:
        def set_user_attr(self, key, value):
            stored[key] = value

    record(Trial(), val_acc=0.5, worker="host:1")
    assert stored == {"val_acc": 0.5, "worker": "host:1"}
    with pytest.raises(KeyError, match="val_accuracy"):
        record(Trial(), val_accuracy=0.5)
    assert "val_accuracy" not in stored


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.rglob("*.toml")), ids=lambda p: p.stem)
def test_each_experiment_file_is_valid_and_names_its_command(path):
    cfg = from_settings(read_experiment(path))
    assert f"python -m continuum.sweep --config {path.relative_to(EXPERIMENTS.parent)}" in path.read_text()
    if path.parent.name == "campaign":  # resumable from the repository: the journal lies beside the tables
        assert cfg.study == path.stem and storage_url(cfg) == f"journal:results/campaign/{cfg.study}/journal.log"
        assert cfg.storage == "journal:{out}/{study}/journal.log"  # a campaign of its own under another --out
        assert cfg.data.holdout == 5000 and cfg.out == "results/campaign"
        assert cfg.lrs != ("tuned",) or (path.parent / f"{cfg.lr_study}.toml").exists()
        assert cfg.retrain is None or (path.parent / f"{cfg.retrain}.toml").exists()
