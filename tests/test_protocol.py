"""The campaign protocol's machinery: a stratified validation split held out of the training images, the test split
scored once after training with per-image correctness stored, learning rates as a grid axis and tuned per point from
a finished study, warm-up, and studies from before these settings still resuming."""

import json

import numpy as np
import optuna
import pandas as pd
import pytest
import torch

from continuum import results
from continuum.data import DataError, TensorData, make_synthetic
from continuum.sweep.cli import main
from continuum.config import ModelConfig
from continuum.sweep.points import grid_points, lr_extensions, point_key, table_config
from continuum.sweep.record import TRIAL_COLUMNS, decode_correct, encode_correct, point_cells
from continuum.sweep.settings import from_settings
from conftest import FAST, SYNTHETIC


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
                 "--lr", "0.02,0.1", "--train-size", "0", "--val-size", "0"]) == 0  # the whole synthetic set
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


def test_a_searchs_trials_validate_on_the_held_out_images_and_never_score_the_test_split(tmp_path):
    assert main([*FAST, "--out", str(tmp_path), "--search", "tpe", "--n-trials", "1", "--holdout", "64",
                 "--train-size", "0", "--val-size", "0"]) == 0
    trials = results.load(tmp_path / "default")
    assert list(trials["state"]) == ["COMPLETE"] and list(trials["val_size"]) == [64]
    assert trials[["test_size", "test_acc", "test_loss", "test_correct"]].isna().all(axis=None)
    summary = (tmp_path / "default" / "summary.md").read_text()
    assert "test_acc" not in summary and "test split" not in summary


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


def test_lr_extend_steps_once_past_the_edge_where_a_points_best_rate_is():
    cfg = from_settings({"segments": "1,4,all", "lr": "0.025,0.05,0.1", "seeds": "0,1", "lr_extend": "on"})
    accuracy = {(1, 0.025): (0.9, 0.8), (1, 0.05): (0.8, 0.9), (1, 0.1): (0.7, 0.7),  # a tie: to the smaller
                (4, 0.025): (0.7, 0.7), (4, 0.05): (0.8, 0.8), (4, 0.1): (0.7, 0.7),  # inside: none
                ("all", 0.025): (0.7, 0.7), ("all", 0.05): (0.7, 0.8), ("all", 0.1): (0.8, 0.9)}
    finished = {point_key(p): accuracy[p.config.segments, p.lr][p.seed] for p in grid_points(cfg)}
    added = [(p.config.segments, p.lr, p.seed) for p in lr_extensions(cfg, finished)]
    assert added == [(1, 0.0125, 0), (1, 0.0125, 1), ("all", 0.2, 0), ("all", 0.2, 1)]
    del finished[point_key(next(p for p in grid_points(cfg) if p.config.segments == 1 and p.seed == 1))]
    assert [(p.config.segments, p.lr) for p in lr_extensions(cfg, finished)] == [("all", 0.2)] * 2  # 1: unfinished
    assert lr_extensions(from_settings({"segments": "1,4,all", "lr": "0.025,0.05,0.1", "seeds": "0,1"}),
                         finished) == []  # not asked for


def test_a_worker_takes_a_point_beyond_the_edge_while_another_point_still_runs(monkeypatch):
    from continuum.sweep import study as study_module
    cfg = from_settings({"segments": "1,4", "lr": "0.025,0.05", "lr_extend": "on"})
    points = {(p.config.segments, p.lr): p for p in grid_points(cfg)}
    grid = [point_key(p) for p in points.values()]
    study = optuna.create_study(direction="maximize")
    for at, acc in {(1, 0.025): 0.9, (1, 0.05): 0.8, (4, 0.025): 0.7}.items():  # segments 1: best at the edge
        key = point_key(points[at])
        study.add_trial(optuna.trial.create_trial(value=acc, user_attrs={"point": key, "val_acc": acc}))
    study.ask().set_user_attr("point", point_key(points[4, 0.05]))  # another worker's, running
    monkeypatch.setattr(study_module.time, "sleep", lambda seconds: pytest.fail("waited for the running point"))
    assert study_module.has_work(study, cfg, grid)
    beyond = point_key(points[1, 0.025]._replace(lr=0.0125))
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs["point"] for t in waiting] == [beyond] and grid[-1] == beyond


def test_a_tuned_sweep_trains_each_point_at_its_rate(tmp_path):
    assert main([*FAST, "--out", str(tmp_path), "--segments", "1,all", "--lr", "0.02,0.2", "--study", "lrs",
                 "--lr-extend"]) == 0
    assert main([*FAST, "--out", str(tmp_path), "--segments", "1,all", "--lr", "tuned", "--lr-study", "lrs",
                 "--study", "main"]) == 0
    tried = results.load(tmp_path / "lrs")
    first = tried[tried["lr"].isin([0.02, 0.2])].sort_values(["val_acc", "lr"], ascending=[False, True])
    beyond = first.groupby("segments")["lr"].first().map({0.02: 0.01, 0.2: 0.4})  # two rates: the best is an edge
    assert len(tried) == 6 and tried.groupby("segments")["lr"].apply(set).to_dict() == {
        segments: {0.02, 0.2, rate} for segments, rate in beyond.items()}
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


SEARCHED = [  # what a search trained: (config, val_acc, flops)
    (ModelConfig(segments=(1, 4, "all"), order=("depthwise_first", "pointwise_first", "depthwise_first"),
                 mid_act=(None, "relu", None), residual=(True, False, True), width=0.75), 0.91, 30e6),
    (ModelConfig(segments="all", width=1.5), 0.93, 60e6),
    (ModelConfig(segments=(16, 16, "all"), mid_act="elu", width=1.25, depths=(2, 1, 1)), 0.92, 40e6),
    (ModelConfig(segments="all", width=1.5), 0.925, 60e6),  # trained again (another seed): counts once
    (ModelConfig(segments=4, width=1.5), 0.90, 70e6),  # dominated: more FLOPs and less accurate
    (ModelConfig(segment_width=8, width=0.5, kernel_size=5, width_divisor=16, drop_rate=0.1), 0.89, 20e6),
]


def write_search(root, rows=SEARCHED, name="search"):
    """A finished search's trials.csv, its point cells written as the sweep writes them."""
    frame = pd.DataFrame([point_cells(config.validate().to_dict() | {"lr": 0.05})
                          | {"trial": i, "state": "COMPLETE", "val_acc": acc, "flops": flops}
                          for i, (config, acc, flops) in enumerate(rows)], columns=TRIAL_COLUMNS)
    (root / name).mkdir(parents=True)
    frame.to_csv(root / name / "trials.csv", index=False)


def test_every_configuration_a_table_shows_reads_back_as_it_was():
    for config, _, _ in SEARCHED:
        cells = pd.Series({k: "" if v is None else str(v) for k, v in point_cells(config.to_dict()).items()})
        assert table_config(cells) == config.validate()
    with pytest.raises(ValueError, match="trial 7's configuration cannot be read back .*segments"):
        table_config(pd.Series(point_cells(ModelConfig().to_dict()) | {"segments": "3.5", "trial": 7}))


def test_a_retrain_trains_the_searchs_front_best_first_once_per_seed(tmp_path):
    write_search(tmp_path)
    cfg = from_settings({"retrain": "search", "retrain_top": 3, "seeds": "0,1", "lr": 0.05, "out": str(tmp_path),
                         "study": "again"})
    points = list(grid_points(cfg))
    best = [SEARCHED[i][0].validate() for i in (1, 2, 0)]  # the front by accuracy: 0.93, 0.92, 0.91 (then 0.89)
    assert [(p.config, p.lr, p.seed) for p in points] == [(c, 0.05, s) for c in best for s in (0, 1)]
    assert len({point_key(p) for p in points}) == 6
    everything = from_settings({"retrain": "search", "retrain_top": 10, "out": str(tmp_path), "study": "again"})
    assert [p.config for p in grid_points(everything)] == [*best, SEARCHED[5][0].validate()]


@pytest.mark.parametrize("settings, message", [
    ({"search": "nsga2"}, "retrain=search trains a search's configurations again; use it in a grid"),
    ({"study": "search"}, "retrain=search is this study; name the finished search"),
    ({"segments": "4", "mid_act": "relu"}, "takes the architectures from the search; leave out mid-act, segments"),
    ({"match_params": 1000}, "leave out match_params"),
    ({"retrain_top": 0}, "0 is not valid; use a whole number >= 1"),
])
def test_a_retrain_that_cannot_take_the_searchs_configurations_is_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        from_settings({"retrain": "search", "study": "again"} | settings)


def test_a_retrain_of_a_search_without_finished_trials_is_refused(tmp_path):
    cfg = from_settings({"retrain": "search", "out": str(tmp_path), "study": "again"})
    with pytest.raises(ValueError, match="retrain=search: no .*trials.csv; run that study first"):
        list(grid_points(cfg))
    write_search(tmp_path, rows=[])
    with pytest.raises(ValueError, match="retrain=search: .*trials.csv has no finished trial; finish that study"):
        list(grid_points(cfg))


@pytest.mark.slow
def test_a_search_then_a_retrain_of_its_best_configuration_with_new_seeds(tmp_path):
    assert main([*FAST, "--out", str(tmp_path), "--study", "search", "--search", "nsga2", "--n-trials", "2",
                 "--width", "0.25,0.5", "--holdout", "64"]) == 0
    searched = results.load(tmp_path / "search")
    assert searched["test_acc"].isna().all()  # the search chose on validation alone
    best = searched.sort_values("val_acc", ascending=False).iloc[0]
    retrain = [*SYNTHETIC, "--out", str(tmp_path), "--study", "again", "--retrain", "search", "--holdout", "64"]
    assert main([*retrain, "--retrain-top", "1", "--seeds", "3,4"]) == 0  # the search's widths
    again = results.load(tmp_path / "again")
    assert list(again["seed"]) == [3, 4] and set(again["state"]) == {"COMPLETE"}
    assert again["test_acc"].notna().all()  # its choice, judged on the test split
    for column in ("segments", "order", "mid_act", "residual", "width"):
        assert set(again[column].astype(str)) == {str(best[column])}
    assert main([*retrain, "--retrain-top", "2", "--seeds", "3,4"]) == 2  # another top is another study's setting
