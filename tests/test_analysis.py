"""Summaries, intervals, EDFs and Pareto fronts."""

import warnings

import numpy as np
import pandas as pd
import pytest

from continuum.analysis import (arm_label, bootstrap_interval, compare, difference, edf, efficiency, holm,
                                mcnemar_test, paired_sides, pareto_front, segments_key, segments_rank, summarize,
                                t_interval)


def _trials():
    rows = []
    for segments, accs in (("1", [0.80, 0.82, 0.81]), ("all", [0.85, 0.86, 0.84]), ("4", [0.83, 0.83, 0.84])):
        for seed, acc in enumerate(accs):
            rows.append({"trial": len(rows), "state": "COMPLETE", "model": "m", "segments": segments, "seed": seed,
                         "val_acc": acc, "params": 100, "macs": {"1": 10, "4": 5, "all": 2}[segments] * 1e6,
                         "flops": 0, "latency_ms": 1.0})
    rows.append(rows[0] | {"trial": 99, "state": "FAIL", "val_acc": 0.1})
    return pd.DataFrame(rows)


def test_summary_per_config_with_t_interval():
    table = summarize(_trials())
    assert list(table["segments"]) == ["1", "4", "all"]
    row = table.iloc[0]
    assert row["n"] == 3 and row["val_acc_mean"] == pytest.approx(0.81)
    half = 4.302653 * np.std([0.80, 0.82, 0.81], ddof=1) / np.sqrt(3)
    assert row["val_acc_ci_low"] == pytest.approx(0.81 - half, rel=1e-5)
    assert row["val_acc_ci_high"] == pytest.approx(0.81 + half, rel=1e-5)


def test_intervals_need_two_values():
    assert all(np.isnan(t_interval([0.5])))
    low, high = bootstrap_interval([0.80, 0.82, 0.81, 0.85], seed=0)
    assert 0.80 <= low <= np.mean([0.80, 0.82, 0.81, 0.85]) <= high <= 0.85


def test_edf_and_pareto():
    curve = edf([0.3, 0.1, 0.2])
    assert list(curve["value"]) == [0.1, 0.2, 0.3] and list(curve["F"]) == pytest.approx([1 / 3, 2 / 3, 1])
    frame = pd.DataFrame({"val_acc": [0.8, 0.9, 0.85, 0.7], "macs": [1, 3, 4, 0.5]})
    assert list(pareto_front(frame)["macs"]) == [0.5, 1, 3]


def test_segments_sort_key():
    assert sorted(["all", "16", "2", "1"], key=segments_key) == ["1", "2", "16", "all"]
    assert sorted(["4/all/16", "16/1/1", "4/16/1", "4/2/16"], key=segments_key) == [
        "4/2/16", "4/16/1", "4/all/16", "16/1/1"]  # per-stage counts stage by stage, not by their text
    cells = pd.Series(["4/all/16", "16/1/1", "4/2/16"], dtype="string[pyarrow]")  # as tables load them
    assert cells.sort_values(key=segments_rank).tolist() == ["4/2/16", "4/all/16", "16/1/1"]


def test_an_arm_is_labelled_by_its_columns_floats_as_the_tables_print_them():
    assert arm_label(["segments", "width", "lr", "mid_act"], ("all", np.float64(1.1111111111154859), 0.0125, None)) == \
        "segments=all, width=1.1111, lr=0.0125, mid_act=None"
    assert arm_label([], ()) == "all trials"


def test_difference_pairs_by_seed():
    trials = _trials()
    result = difference(trials, "segments", "1", "all")
    paired = np.array([0.85, 0.86, 0.84]) - np.array([0.80, 0.82, 0.81])
    assert result["n"] == 3 and result["diff"] == pytest.approx(paired.mean())
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(t_interval(paired))
    unpaired = trials.assign(seed=np.where(trials["segments"] == "all", trials["seed"] + 10, trials["seed"]))
    welch = difference(unpaired, "segments", "1", "all")
    assert welch["diff"] == pytest.approx(paired.mean()) and welch["ci_low"] < welch["diff"] < welch["ci_high"]
    assert welch["ci_high"] - welch["ci_low"] > 0
    running = trials.iloc[0].to_dict() | {"trial": 100, "segments": "64", "state": "RUNNING"}
    not_yet = pd.concat([trials, pd.DataFrame([running])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" where a side has no completed trial
        missing = difference(not_yet, "segments", "1", "64")
    assert missing["n"] == 0 and np.isnan([missing["diff"], missing["ci_low"], missing["ci_high"]]).all()
    with pytest.raises(ValueError, match="segments='46' is in no trial of the table; its values: 1, 4, all"):
        difference(trials, "segments", "1", "46")  # a misspelt side is not a side without results yet


@pytest.mark.parametrize("call, message", [
    (lambda t: summarize(t, metric="test_acc"), "the trials table has no column 'test_acc'; its columns: trial,"),
    (lambda t: summarize(t, by=["order"]), "the trials table has no column 'order'"),
    (lambda t: difference(t, "order", "a", "b"), "the trials table has no column 'order'"),
    (lambda t: paired_sides(t, "segments", "1", "all", metric="test_acc"), "no column 'test_acc'"),
    (lambda t: pareto_front(t, minimize="latency"), "the table has no column 'latency'"),
    (lambda t: difference(t, "segments", "1", "all", level=95), "level=95 is not valid; use a number between 0 and 1"),
    (lambda t: t_interval([0.1, 0.2], level=0), "level=0 is not valid"),
    (lambda t: compare([0.8, 0.9], [0.8, 0.9], margin=-0.01), "margin=-0.01 is not valid; use a positive number"),
    (lambda t: compare([0.8, 0.9], [0.8, 0.9], margin=float("nan")), "margin=nan is not valid"),
    (lambda t: holm([0.01, 1.5]), "p-value 1.5 is not valid; p-values lie in 0..1"),
    (lambda t: mcnemar_test([np.ones(3, bool)], []), "1 baseline runs and 0 other runs"),
    (lambda t: mcnemar_test([np.ones(3, bool)], [np.ones(4, bool)]), "a pair of runs scored 3 and 4 images"),
    (lambda t: mcnemar_test([np.array([0.5, 1])], [np.array([1, 1])]), "must be True/False"),
])
def test_wrong_columns_and_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(_trials())


def test_one_column_name_is_taken_as_pandas_takes_it_and_correctness_as_0_1():
    assert summarize(_trials(), by="segments").equals(summarize(_trials(), by=["segments"]))
    as_ints = mcnemar_test([np.array([1, 0, 1])], [np.array([0, 1, 1])])
    assert as_ints == mcnemar_test([np.array([True, False, True])], [np.array([False, True, True])])
    assert as_ints["only_baseline"] == 1 and as_ints["only_other"] == 1
    assert np.isnan(holm([0.01, float("nan")])[1])  # a test that could not run stays NaN
    assert all(side.empty for side in paired_sides(_trials(), "segments", "1", "64", "val_acc"))  # not started yet


def test_efficiency_divides_accuracy_by_cost():
    summary = summarize(_trials()).assign(flops=[2e9, 1e9, 0.5e9], latency_ms=[4.0, 2.0, 1.0])
    table = efficiency(summary)
    assert list(table["val_acc_per_gflop"]) == pytest.approx(table["val_acc_mean"] / [2, 1, 0.5])
    assert list(table["val_acc_per_ms"]) == pytest.approx(table["val_acc_mean"] / [4, 2, 1])


def test_a_latency_measured_on_a_busy_machine_is_marked_in_the_summary():
    from continuum.analysis import summary_markdown
    trials = _trials()
    assert "latency_contended" not in summarize(trials)  # tables without the record read as before
    trials["latency_load"] = [0.0] * 3 + [0.5] + [0.01] * 6
    trials["fail_reason"] = None
    table = summarize(trials)
    assert list(table["latency_contended"]) == [False, False, True]  # segments 1, 4, all
    text = summary_markdown(trials, "t")
    assert "1.00 *" in text and "contended, not to be trusted" in text


def test_failed_trials_are_listed_per_point_with_what_became_of_it():
    from continuum.analysis import failures_by_point, summary_markdown
    base = {"model": "m", "params": 100, "macs": 1e6, "flops": 2e6, "latency_ms": 1.0, "seed": 0, "val_acc": 0.9}
    rows = [(0, "1", 0.05, "FAIL", "interrupted", 2), (1, "all", 0.05, "FAIL", "interrupted", 1),
            (2, "1", 0.05, "FAIL", "interrupted", 3), (3, "1", 0.05, "COMPLETE", None, 5),
            (4, "all", 0.05, "RUNNING", None, 0), (5, "1", 0.1, "FAIL", "ValueError: loss is nan", 0),
            (6, "1", 0.1, "COMPLETE", None, 5)]
    trials = pd.DataFrame([base | dict(zip(("trial", "segments", "lr", "state", "fail_reason", "epochs_done"), row))
                           for row in rows])
    table = failures_by_point(trials)
    assert list(table["point"]) == ["segments 1, lr 0.05, seed 0", "segments all, lr 0.05, seed 0",
                                    "segments 1, lr 0.1, seed 0"]
    assert list(table["trials"]) == [[0, 2], [1], [5]] and list(table["epochs_done"]) == [[2, 3], [1], [0]]
    assert list(table["completed_by"].astype(object)) == [3, pd.NA, 6]
    assert list(table["running_as"].astype(object)) == [pd.NA, 4, pd.NA]
    text = summary_markdown(trials, "t")
    assert "Failed trials, per point, with the trial that later completed the point or runs it now:\n" in text
    assert ("- segments 1, lr 0.05, seed 0: completed by trial 3\n  - trial 0, after 2 epochs: interrupted\n"
            "  - trial 2, after 3 epochs: interrupted\n") in text
    assert "- segments all, lr 0.05, seed 0: running as trial 4\n  - trial 1, after 1 epoch: interrupted\n" in text
    assert "completed by trial 6\n  - trial 5, after 0 epochs: ValueError: loss is nan\n" in text
    assert failures_by_point(trials[trials["state"] != "FAIL"]).empty
