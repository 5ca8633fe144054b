"""The campaign protocol's machinery: a stratified validation split held out of the training images, the test split
scored once after training with per-image correctness stored, learning rates as a grid axis and tuned per point from
a finished study, warm-up, and studies from before these settings still resuming."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from continuum import results
from continuum.data import DataError, TensorData, make_synthetic
from continuum.sweep.cli import main
from continuum.sweep.points import grid_points, point_key
from continuum.sweep.record import decode_correct, encode_correct
from continuum.sweep.settings import from_settings
from conftest import FAST


def test_holdout_is_stratified_fixed_and_keeps_the_test_split_apart():
    data = make_synthetic(num_classes=4, train_size=400, val_size=100)
    held = data.holdout(40)
    assert (len(held.train_y), len(held.val_y), len(held.test_y)) == (360, 40, 100)
    assert torch.equal(held.test_x, data.val_x) and torch.equal(held.test_y, data.val_y)
    shares = torch.bincount(data.train_y, minlength=4).double() * 40 / 400
    assert (torch.bincount(held.val_y, minlength=4) - shares).abs().max() < 1  # each class its share
    # the held-out and the training images together are the former training images, each once
    together = torch.cat([held.train_x, held.val_x]).flatten(1)
    assert sorted(map(bytes, together.numpy())) == sorted(map(bytes, data.train_x.flatten(1).numpy()))
    assert torch.equal(data.holdout(40).val_x, held.val_x)  # the same split every time
    assert not torch.equal(data.holdout(40, seed=1).val_x, held.val_x)
    assert data.holdout(0) is data
    small = held.subset(100, 20)  # subsets draw from the rest and from the held-out images; the test stays whole
    assert (len(small.train_y), len(small.val_y), len(small.test_y)) == (100, 20, 100)


def test_holdout_refuses_what_cannot_be_done():
    data = make_synthetic(num_classes=2, train_size=10, val_size=4)
    with pytest.raises(DataError, match="holdout=10 is not valid for synthetic's 10 training images; hold out fewer"):
        data.holdout(10)
    with pytest.raises(DataError, match="a validation split is already held out; hold out once"):
        data.holdout(2).holdout(2)


def test_correctness_text_round_trips_and_refuses_garbage():
    correct = np.random.default_rng(0).random(10_000) < 0.9
    text = encode_correct(correct)
    assert len(text) == 1668 and np.array_equal(decode_correct(text, 10_000), correct)
    assert np.array_equal(decode_correct(encode_correct([True, False, True]), 3), [True, False, True])
    with pytest.raises(ValueError, match="not valid base64"):
        decode_correct("not base64!", 3)
    with pytest.raises(ValueError, match="holds 8 bits, not 20 images' worth"):
        decode_correct(encode_correct([True] * 5), 20)


def test_a_holdout_sweep_validates_on_held_out_images_and_scores_the_test_split_once(tmp_path):
    assert main([*FAST, "--out", str(tmp_path), "--segments", "4", "--holdout", "64", "--warmup-epochs", "0.5",
                 "--lr", "0.02,0.1"]) == 0
    trials = results.load(tmp_path / "default")
    assert list(trials["lr"]) == [0.02, 0.1] and set(trials["state"]) == {"COMPLETE"}
    assert set(trials["train_size"]) == {448} and set(trials["val_size"]) == {64}
    assert set(trials["test_size"]) == {256} and set(trials["warmup_epochs"]) == {0.5}
    for _, row in trials.iterrows():
        correct = decode_correct(row["test_correct"], 256)
        assert correct.mean() == pytest.approx(row["test_acc"])
    curves = results.load(tmp_path / "default", curves=True)
    assert list(curves["lr"]) == [0.02, 0.1]  # the point's rate; the epoch's own is epoch_lr
    assert (curves["epoch_lr"] < curves["lr"]).all()  # warm-up: the first epoch starts below the rate
    summary = (tmp_path / "default" / "summary.md").read_text()
    assert "lr" in summary  # the two rates are reported apart


def write_lr_study(root, rows):
    """A finished lr study's trials.csv holding ``rows`` of (segments, lr, val_acc), as the sweep writes it."""
    cfg = from_settings({"segments": "1,all"})
    cells = {k: "none" if v is None else str(v) for k, v in next(grid_points(cfg)).config.to_dict().items()}
    frame = pd.DataFrame([cells | {"trial": i, "state": "COMPLETE", "segments": s, "lr": lr, "val_acc": acc}
                          for i, (s, lr, acc) in enumerate(rows)])
    (root / "lrs").mkdir(parents=True)
    frame.to_csv(root / "lrs" / "trials.csv", index=False)


def test_tuned_rates_are_each_points_best_mean_on_validation(tmp_path):
    write_lr_study(tmp_path, [("1", 0.1, 0.80), ("1", 0.05, 0.85), ("all", 0.1, 0.90), ("all", 0.05, 0.70),
                              ("all", 0.1, 0.80), ("all", 0.2, 0.85), ("all", 0.2, 0.85)])
    cfg = from_settings({"segments": "1,all", "lr": "tuned", "lr_study": "lrs", "seeds": "0,1", "out": str(tmp_path)})
    points = list(grid_points(cfg))
    assert [(p.config.segments, p.lr, p.seed) for p in points] == [(1, 0.05, 0), (1, 0.05, 1), ("all", 0.1, 0),
                                                                    ("all", 0.1, 1)]  # tie 0.85: the smaller
    assert json.loads(point_key(points[0]))["lr"] == 0.05
    missing = from_settings({"segments": "4", "lr": "tuned", "lr_study": "lrs", "out": str(tmp_path)})
    with pytest.raises(ValueError, match="lr_study=lrs has no finished trial of .*segments=4|lr_study=lrs has no"):
        list(grid_points(missing))
    nowhere = from_settings({"segments": "4", "lr": "tuned", "lr_study": "other", "out": str(tmp_path)})
    with pytest.raises(ValueError, match="lr_study=other: no .*trials.csv; run that study first"):
        list(grid_points(nowhere))


def test_a_tuned_sweep_trains_each_point_at_its_rate(tmp_path):
    assert main([*FAST, "--out", str(tmp_path), "--segments", "1,all", "--lr", "0.02,0.2", "--study", "lrs"]) == 0
    assert main([*FAST, "--out", str(tmp_path), "--segments", "1,all", "--lr", "tuned", "--lr-study", "lrs",
                 "--study", "main"]) == 0
    tried = results.load(tmp_path / "lrs")
    best = tried.sort_values(["val_acc", "lr"], ascending=[False, True]).groupby("segments")["lr"].first()
    trained = results.load(tmp_path / "main").set_index("segments")["lr"]
    assert trained.to_dict() == best.to_dict()


def test_studies_from_before_the_protocol_settings_keep_their_settings_and_keys():
    cfg = from_settings({"segments": "4"})
    settings = cfg.fixed_settings()
    assert "holdout" not in settings["data"] and "warmup_epochs" not in settings["train"]
    assert settings["train"]["lr"] is None and "lr_study" not in settings
    assert "lr" not in json.loads(point_key(
        next(grid_points(cfg))))
    several = from_settings({"segments": "4", "lr": "0.1,0.2", "holdout": 5000, "warmup_epochs": 1})
    assert "lr" not in several.fixed_settings()["train"]
    assert several.fixed_settings()["data"]["holdout"] == 5000


def test_tensor_data_without_a_test_split_scores_none():
    data = TensorData("x", torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]),
                      torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]), 2)
    assert data.test_x is None and data.subset(2, 1).test_x is None
