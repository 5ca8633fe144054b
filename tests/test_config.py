"""Config dataclasses: normalisation, round trips, errors naming the field."""

import pytest

from continuum.config import DataConfig, ModelConfig, TrainConfig
from continuum.knobs import parse_bool, spread
from continuum.sweep.settings import SweepConfig


def test_model_config_normalises_and_round_trips():
    config = ModelConfig(segments="8", order="pointwise-first", mid_act="None", residual="off").validate()
    assert (config.segments, config.order, config.mid_act, config.residual) == (8, "pointwise_first", None, False)
    assert ModelConfig.from_dict(config.to_dict()) == config
    staged = ModelConfig(segments=[1, "all", 4], residual=("on", "off", "on")).validate()
    assert staged.segments == (1, "all", 4) and staged.model_kwargs()["residual"] == [True, False, True]


@pytest.mark.parametrize("kwargs,message", [
    (dict(segments=0), "segments=0 is not valid"),
    (dict(order="up"), "order='up' is not valid"),
    (dict(mid_act="swish2"), "mid_act='swish2' is not valid"),
    (dict(width=0), "width=0 is not valid"),
])
def test_model_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs).validate()


def test_unknown_fields_are_named():
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['epoch'\]"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['colour'\]"):
        SweepConfig.from_dict({"colour": 1})


def test_sweep_config_nested_dicts_and_fixed_settings():
    cfg = SweepConfig.from_dict({"segments": [1, "all"], "train": {"epochs": 5}, "data": {"dataset": "synthetic"}})
    assert cfg.train.epochs == 5 and cfg.data == DataConfig(dataset="synthetic")
    assert cfg.fixed_settings()["train"]["epochs"] == 5
    with pytest.raises(ValueError, match="pruning needs a single objective"):
        SweepConfig(objectives=("val_acc", "flops"), pruner="median").validate()


def test_parse_bool_and_spread():
    assert parse_bool("on") and not parse_bool("OFF") and parse_bool(True)
    with pytest.raises(ValueError, match="use on or off"):
        parse_bool("perhaps")
    assert spread({"default": 1, "b": 2}, ("a", "b"), "k") == {"a": 1, "b": 2}
    with pytest.raises(ValueError, match=r"k: 1 values for 2 parts"):
        spread([1], ("a", "b"), "k")


def test_model_kwargs_leave_default_knobs_to_the_model():
    assert ModelConfig().validate().model_kwargs() == {"drop_rate": 0.0}
    kwargs = ModelConfig(segments=(1, 4, "all"), mid_act="relu", residual="off").validate().model_kwargs()
    assert kwargs == {"drop_rate": 0.0, "segments": [1, 4, "all"], "mid_act": "relu", "residual": False}
