"""The campaign's rules as code: paired tests, Holm, TOST, McNemar, the verdict vocabulary, the pilot's length
check and seed count, and the report written from tables alone."""

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from continuum import campaign
from continuum.analysis import arm_label, compare, holm, mcnemar_test, paired_sides
from continuum.campaign import length_check, seeds_needed, verdict
from continuum.sweep.record import encode_correct
from continuum.sweep.record import TRIAL_COLUMNS


def test_compare_is_a_paired_t_test_with_its_interval_and_tost():
    a, b = [0.900, 0.910, 0.905, 0.900], [0.902, 0.912, 0.906, 0.903]
    c = compare(a, b)
    assert c.diff == pytest.approx(0.002) and c.n == 4 and c.ci_low < 0.002 < c.ci_high
    assert c.p == pytest.approx(0.01628, abs=1e-4)  # scipy's ttest_rel
    assert c.p_equivalent < 0.001  # 0.2 points, tightly: equivalent within ±1 point
    far = compare([0.90, 0.91, 0.905], [0.93, 0.945, 0.935])
    assert far.p < 0.01 and far.p_equivalent > 0.9
    with pytest.raises(ValueError, match="at least 2 values, not 1 and 1"):
        compare([0.9], [0.8])
    with pytest.raises(ValueError, match="not 2 and 3"):
        compare([0.9, 0.8], [0.8, 0.7, 0.6])
    same = compare([0.9, 0.8], [0.91, 0.81])  # every pair differs by exactly 1 point minus rounding
    assert same.sd < 1e-12 and same.p == 0.0


def test_holm_adjusts_in_the_order_given():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([]) == []


def test_mcnemar_pools_the_discordant_images_of_every_pair():
    a = [np.array([True, True, False, False]), np.array([True, False, True, True])]
    b = [np.array([True, False, True, True]), np.array([False, False, True, True])]
    result = mcnemar_test(a, b)
    assert (result["only_baseline"], result["only_other"]) == (2, 2) and result["p"] == pytest.approx(1.0)


def test_paired_sides_pair_by_seed_and_drop_unpaired_or_unfinished_trials():
    trials = pd.DataFrame({"state": ["COMPLETE"] * 5 + ["FAIL"], "segments": ["1", "1", "all", "all", "all", "1"],
                           "seed": [0, 1, 1, 0, 2, 2], "test_acc": [0.8, 0.9, 0.95, 0.85, 0.5, 0.1]})
    a, b = paired_sides(trials, "segments", "1", "all")
    assert list(a.index) == [0, 1] and list(a) == [0.8, 0.9] and list(b) == [0.85, 0.95]


@pytest.mark.parametrize("diff, p, p_eq, claim, word", [
    (0.02, 0.01, 0.9, "higher", "reproduced"),
    (-0.02, 0.01, 0.9, "higher", "contradicted"),
    (-0.02, 0.01, 0.9, "lower", "reproduced"),
    (0.02, 0.01, 0.9, "equal", "contradicted"),
    (0.002, 0.40, 0.01, "equal", "equivalent within ±1 pt"),
    (0.002, 0.40, 0.01, "higher", "equivalent within ±1 pt"),
    (0.01, 0.20, 0.30, "higher", "inconclusive"),
    (0.01, 0.01, 0.01, None, "not tested"),
])
def test_verdicts_follow_their_rules(diff, p, p_eq, claim, word):
    comparison = compare([0.9, 0.9, 0.9], [0.9 + diff + e for e in (-0.001, 0, 0.001)])
    assert verdict(comparison, p, p_eq, claim) == word
    assert word in campaign.VERDICTS


def test_a_claim_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="claim='better' is not valid; choose one of higher, lower, equal"):
        verdict(None, 0.0, 0.0, "better")
    assert verdict(None, 0.0, 0.0, "higher") == "not tested"


def test_length_check_and_seed_count():
    short = compare([0.90, 0.91, 0.92], [0.88, 0.885, 0.90])
    assert length_check(short, compare([0.91, 0.92, 0.93], [0.89, 0.895, 0.91])).passed  # moved 0
    moved = length_check(short, compare([0.91, 0.92, 0.93], [0.885, 0.89, 0.90]))
    assert moved.same_ranking and not moved.passed and moved.moved < -0.003
    assert not length_check(short, compare([0.90, 0.91, 0.92], [0.91, 0.92, 0.93])).same_ranking
    assert seeds_needed(0.001) == campaign.MIN_SEEDS
    # t(0.975, n-1) * sd / sqrt(n) <= 1 point: sd 1.5 points needs 12 seeds (t=2.201, 2.201*1.5/3.46=0.953)
    assert seeds_needed(0.015) == 12 and seeds_needed(0.01) == 7


def _pilot_table(folder, diffs):
    rows = []
    for seed, d in enumerate(diffs):
        for segments, acc in (("1", 0.90 + seed / 1000), ("all", 0.90 + seed / 1000 + d)):
            rows.append({"trial": len(rows), "state": "COMPLETE", "model": "continuum_small", "segments": segments,
                         "seed": seed, "val_acc": acc, "test_acc": acc, "train_s": 1800.0, "threads": 1})
    folder.mkdir(parents=True)
    pd.DataFrame(rows, columns=TRIAL_COLUMNS).to_csv(folder / "trials.csv", index=False)


def _registered_seeds(root):
    return campaign.registered_seeds(campaign.read_pilot(root))


def _section(ablation, root, seeds):
    """The report's section on ``ablation``, judged with ``seeds``."""
    return campaign.ablation_section(campaign.judge(ablation, root, seeds))


def _glance(root):
    """The report's first section, its lines as :func:`campaign.report` writes them."""
    text = campaign.report(root)
    return text[text.index("## Verdicts at a glance"):text.index("## Pilot")].splitlines()


def test_the_report_is_written_from_the_tables_alone(tmp_path, capsys):
    assert campaign.main([str(tmp_path)]) == 2  # no study in it: a mistyped root gets no report of nothing
    assert "holds no study" in capsys.readouterr().err and not (tmp_path / "README.md").exists()
    _pilot_table(tmp_path / "pilot", [-0.020, -0.022, -0.018])
    _pilot_table(tmp_path / "pilot_long", [-0.021, -0.023, -0.019])
    assert campaign.main([str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "all - 1 = -2.00 points" in text and "**passed: 5 epochs**" in text and "Convergence" not in text
    assert "(`pilot`, n = 3 paired seeds, 3.0 core-hours)" in text
    assert "Seeds (`pilot`): sd 0.20 points -> 3 seeds" in text
    unfinished = pd.read_csv(tmp_path / "pilot_long" / "trials.csv")
    unfinished.loc[unfinished["seed"] == 2, "state"] = "RUNNING"  # a pair not finished: no verdict yet
    unfinished.to_csv(tmp_path / "pilot_long" / "trials.csv", index=False)
    lines = campaign.pilot_section(tmp_path, campaign.read_pilot(tmp_path))
    assert "- Length check: waits for `pilot_long`'s other paired seeds (2 of 3 finished); no verdict, and no seed " \
        "count, before that." in lines and not any("Seeds" in line for line in lines)
    _pilot_table(tmp_path / "pilot_long_moved", [0.010, 0.012, 0.008])
    (tmp_path / "pilot_long").rename(tmp_path / "pilot_unfinished")
    (tmp_path / "pilot_long_moved").rename(tmp_path / "pilot_long")
    lines = campaign.pilot_section(tmp_path, campaign.read_pilot(tmp_path))
    assert any("**failed: 15 epochs**" in line for line in lines)
    assert "- **Convergence is not shown**: the ablations train 15 epochs, with the learning rates chosen at 5; the " \
        "same check from 15 to 45 epochs (`pilot_longer`) waits for its paired seeds (0 of 3 finished)." in lines
    assert any(line.startswith("- Seeds (`pilot_long`): sd 0.20 points") for line in lines)  # the longer pilot's sd
    _pilot_table(tmp_path / "pilot_longer", [0.011, 0.013, 0.009])  # 15 -> 45 epochs: moved 0.1 point, same sign
    longer = campaign.read_pilot(tmp_path)
    lines = campaign.pilot_section(tmp_path, longer)
    assert "- Convergence check, 15 to 45 epochs (same ranking, difference moved +0.10 points; limit 0.3): **passed: " \
        "convergence shown at 15 epochs**." in lines and not any("not shown" in line for line in lines)
    assert any(line.startswith("- 45 epochs (`pilot_longer`, n = 3 paired seeds") for line in lines)
    assert campaign.registered_seeds(longer) == 3  # the convergence check changes no seed count
    moved = pd.read_csv(tmp_path / "pilot_longer" / "trials.csv")
    moved.loc[moved["segments"] == "all", "val_acc"] -= 0.02  # the difference turns: +1.1 -> -0.9 points
    moved.to_csv(tmp_path / "pilot_longer" / "trials.csv", index=False)
    lines = campaign.pilot_section(tmp_path, campaign.read_pilot(tmp_path))
    assert "- Convergence check, 15 to 45 epochs (different ranking, difference moved -1.90 points; limit 0.3): " \
        "**failed: convergence is not shown at 15 epochs**." in lines
    assert "- The ablations were not rerun at 45 epochs: their rankings may still move with training length." in lines
    moved[moved["seed"] < 2].to_csv(tmp_path / "pilot_longer" / "trials.csv", index=False)  # 2 of 3 seeds so far
    lines = campaign.pilot_section(tmp_path, campaign.read_pilot(tmp_path))
    assert any(line.endswith("waits for its paired seeds (2 of 3 finished).") for line in lines)
    (tmp_path / "pilot_longer" / "trials.csv").unlink()
    (tmp_path / "pilot_longer").rmdir()
    assert "Learning rates (`pilot_lr`): not run yet." in text
    _pilot_table(tmp_path / "pilot_one", [-0.020])  # one paired seed: too few for the check, and said so singly
    (tmp_path / "pilot_long").rename(tmp_path / "pilot_three")
    (tmp_path / "pilot_one").rename(tmp_path / "pilot_long")
    lines = campaign.pilot_section(tmp_path, campaign.read_pilot(tmp_path))
    assert any(line.endswith("(`pilot_long`): 1 paired seed finished; the check needs 2 or more.") for line in lines)
    rates = [("1", 0.025, 0.90), ("1", 0.05, 0.92), ("all", 0.025, 0.91), ("all", 0.05, 0.91)]
    (tmp_path / "pilot_lr").mkdir()
    pd.DataFrame([{"trial": i, "state": "COMPLETE", "model": "continuum_small", "segments": s, "lr": lr, "seed": 0,
                   "val_acc": acc} for i, (s, lr, acc) in enumerate(rates)],
                 columns=TRIAL_COLUMNS).to_csv(tmp_path / "pilot_lr" / "trials.csv", index=False)
    lines = campaign.lr_lines(tmp_path, "pilot_lr", [campaign.PILOT_COLUMN])
    assert "| segments   |   lr 0.025 |   lr 0.05 |   chosen lr |" in lines[2]
    assert lines[2].splitlines()[-2:] == ["| 1          |     0.9000 |    0.9200 |      0.0500 |",
                                          "| all        |     0.9100 |    0.9100 |      0.0250 |"]  # a tie: smaller
    one_arm = pd.read_csv(tmp_path / "pilot_lr" / "trials.csv").iloc[:2]  # only segments=1 finished so far
    one_arm.to_csv(tmp_path / "pilot_lr" / "trials.csv", index=False)
    one_arm_lines = campaign.lr_lines(tmp_path, "pilot_lr", [campaign.PILOT_COLUMN])
    assert one_arm_lines[0].startswith("Learning rates (`pilot_lr`, 2 trials finished")
    assert one_arm_lines[2].splitlines()[0] == "|   segments |   lr 0.025 |   lr 0.05 |   chosen lr |"  # still named
    assert one_arm_lines[2].splitlines()[-1] == "|          1 |     0.9000 |    0.9200 |      0.0500 |"
    assert campaign.main([str(tmp_path / "nothing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["", "trial,state\n0,COMPLE", "a,b\n1,2\n"])
def test_a_damaged_study_table_stops_the_report_in_one_line_and_keeps_the_last_one(tmp_path, capsys, damage):
    _pilot_table(tmp_path / "pilot", [-0.020, -0.022, -0.018])
    assert campaign.main([str(tmp_path)]) == 0
    before = (tmp_path / "README.md").read_text()
    (tmp_path / "pilot" / "trials.csv").write_text(damage)  # empty, cut off mid-row, not a trials table
    capsys.readouterr()
    assert campaign.main([str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {tmp_path / 'pilot' / 'trials.csv'}") and error.count("\n") == 1, error
    assert (tmp_path / "README.md").read_text() == before  # not "not run yet"


def _study_table(folder, arms, seeds=(0, 1, 2), images=40):
    """A finished study's trials.csv: ``arms`` maps a dict of point columns to per-seed test accuracies."""
    rows = []
    for cells, accuracies in arms:
        for seed, acc in zip(seeds, accuracies):
            correct = np.zeros(images, dtype=bool)
            correct[:round(acc * images)] = True
            rows.append({"trial": len(rows), "state": "COMPLETE", "model": "continuum_small", "segments": "all",
                         "order": "depthwise_first", "mid_act": "none", "residual": True, "seed": seed,
                         "val_acc": acc, "test_acc": acc, "test_size": images, "params": 1000, "macs": 10,
                         "flops": 20, "train_s": 3600.0, "threads": 1,
                         "test_correct": encode_correct(correct)} | cells)
    folder.mkdir(parents=True)
    pd.DataFrame(rows, columns=TRIAL_COLUMNS).to_csv(folder / "trials.csv", index=False)


def test_an_ablation_family_is_holm_corrected_and_judged(tmp_path):
    _study_table(tmp_path / "order", [
        ({"segments": "all", "order": "depthwise_first"}, [0.900, 0.910, 0.920]),
        ({"segments": "all", "order": "pointwise_first"}, [0.901, 0.911, 0.920]),
        ({"segments": "4", "order": "depthwise_first"}, [0.900, 0.910, 0.920]),
        ({"segments": "4", "order": "pointwise_first"}, [0.850, 0.862, 0.868])])
    order = next(a for a in campaign.ABLATIONS if a.studies == ("order",))
    family = campaign.family_table(order, {"order": campaign.load(tmp_path / "order")}, seeds=3)
    assert list(family["n"]) == [3, 3]
    assert family["diff"].tolist() == pytest.approx([0.000667, -0.05], abs=1e-5)
    p = sorted(family["p"])
    assert sorted(family["p_holm"]) == pytest.approx([2 * p[0], max(2 * p[0], p[1])])
    assert list(family["verdict"]) == ["equivalent within ±1 pt", "contradicted"]
    assert family["mcnemar_p"].iloc[1] < 0.05  # 6 images lost per seed, none won
    _pilot_table(tmp_path / "pilot", [-0.020, -0.022, -0.018])
    _pilot_table(tmp_path / "pilot_long", [-0.021, -0.023, -0.019])  # the pilot fixes 3 seeds
    text = "\n".join(_section(order, tmp_path, _registered_seeds(tmp_path)))
    assert "equivalent within ±1 pt" in text and "`order` (12 trials, 12.0 core-hours" in text
    assert "Interim" not in text
    glance = "\n".join(_glance(tmp_path))  # the answers first
    rows = [line.split("|")[1:-1] for line in glance.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == sum(len(ablation.family) for ablation in campaign.ABLATIONS)  # every comparison, once
    order_rows = {row[1].strip(): row[-1].strip() for row in rows if row[0].strip() == "order"}
    assert order_rows == dict(zip(family["comparison"], family["verdict"]))  # as the order section judges them
    assert {row[-1].strip() for row in rows if row[0].strip() == "residual"} == {"interim (0 of 3 seeds)"}
    assert "- Interior optimum (`spectrum_params`, pre-registered): **interim: waits for every arm's paired " \
        "seeds**." in glance and "- Length check (same ranking" in glance and "**passed: 5 epochs**" in glance


def test_a_family_without_every_comparisons_registered_seeds_is_interim_with_no_holm_and_no_verdict(tmp_path):
    order = next(a for a in campaign.ABLATIONS if a.studies == ("order",))
    _study_table(tmp_path / "order", [  # segments 4: 3 seeds, a clear difference; segments all: 2 seeds so far
        ({"segments": "4", "order": "depthwise_first"}, [0.900, 0.910, 0.920]),
        ({"segments": "4", "order": "pointwise_first"}, [0.850, 0.862, 0.868]),
        ({"segments": "all", "order": "depthwise_first"}, [0.900, 0.910]),
        ({"segments": "all", "order": "pointwise_first"}, [0.901, 0.911])])
    tables = {"order": campaign.load(tmp_path / "order")}
    family = campaign.family_table(order, tables, seeds=3)
    assert list(family["n"]) == [2, 3] and family["p"].notna().all() and family["diff"].notna().all()
    assert family["p_holm"].isna().all() and family["p_tost_holm"].isna().all()  # Holm over part of a family: none
    assert list(family["verdict"]) == ["interim (2 of 3 seeds)", "interim (family incomplete)"]
    assert list(campaign.family_table(order, {}, seeds=3)["verdict"]) == ["interim (0 of 3 seeds)"] * 2  # queued
    one_pair = tables["order"][(tables["order"]["segments"].astype(str) == "4") | (tables["order"]["seed"] == 0)]
    family = campaign.family_table(order, {"order": one_pair}, seeds=3)  # one pair: counted, too few for an interval
    assert list(family["n"]) == [1, 3] and list(family["p"].isna()) == [True, False]
    assert family["verdict"][0] == "interim (1 of 3 seeds)"
    unfixed = campaign.family_table(order, tables, seeds=None)  # no pilot yet: nothing is judged
    assert set(unfixed["verdict"]) == {"interim (the pilot has not fixed the seeds)"}
    judged = campaign.family_table(order, tables, seeds=2)  # had the pilot fixed 2 seeds, the family is complete
    assert judged["p_holm"].notna().all() and judged["verdict"].isin(campaign.VERDICTS).all()
    text = "\n".join(_section(order, tmp_path, seeds=None))  # no pilot yet
    assert "**Interim**: the pilot has not fixed the seeds per arm yet" in text and "contradicted" not in text
    _pilot_table(tmp_path / "pilot", [-0.020, -0.022, -0.018])
    _pilot_table(tmp_path / "pilot_long", [-0.021, -0.023, -0.019])
    assert _registered_seeds(tmp_path) == 3
    text = "\n".join(_section(order, tmp_path, _registered_seeds(tmp_path)))
    assert "**Interim**: 1 of 2 comparisons have their 3 paired seeds (the pilot's count)" in text
    assert "| interim (2 of 3 seeds)" in text and "contradicted" not in text
    assert f"- *interim*: {campaign.INTERIM_RULE}." in campaign.report(tmp_path)


def test_the_report_goes_where_report_says_with_its_plot_links_from_there(tmp_path, capsys):
    root = tmp_path / "results" / "campaign"
    _study_table(root / "order", [({"order": "depthwise_first"}, [0.90, 0.91, 0.92]),
                                  ({"order": "pointwise_first"}, [0.90, 0.91, 0.92])])
    out = tmp_path / "results" / "README.md"
    assert campaign.main([str(root), "--report", str(out)]) == 0 and not (root / "README.md").exists()
    text = out.read_text()
    assert f"Regenerate with `python -m continuum.campaign {root} --report {out}`." in text
    assert "![order curves](campaign/order/curves.png)" in text  # from results/, as the file sits
    assert campaign.main([str(root)]) == 0  # the default: ROOT/README.md, links from the root
    assert "![order curves](order/curves.png)" in (root / "README.md").read_text()
    capsys.readouterr()
    table = (root / "order" / "trials.csv").read_text()
    for bad in [root, root / "order" / "trials.csv", ""]:  # a folder, a table it would overwrite, nothing
        assert campaign.main([str(root), "--report", str(bad)]) == 2
        error = capsys.readouterr().err
        assert error == f"error: --report {Path(bad)} is not a Markdown file; give one such as results/README.md\n"
    assert campaign.main([str(root), "--report", str(root / "order" / "trials.csv" / "README.md")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot write the report to") and error.count("\n") == 1, error
    assert out.read_text() == text and (root / "order" / "trials.csv").read_text() == table  # nothing overwritten

def test_the_registered_seeds_are_the_pilots_count_capped_at_the_machines_most(tmp_path):
    assert _registered_seeds(tmp_path) is None
    _pilot_table(tmp_path / "pilot", [-0.020, -0.022, -0.018])
    assert _registered_seeds(tmp_path) is None  # the long pilot decides which spread counts
    _pilot_table(tmp_path / "pilot_long", [0.010, 0.030, -0.010])  # failed length check: pilot_long's sd, 2 points
    assert campaign.seeds_needed(0.02) > campaign.MAX_SEEDS
    assert _registered_seeds(tmp_path) == campaign.MAX_SEEDS


def test_an_interaction_subtracts_the_per_seed_differences_of_another_study(tmp_path):
    _study_table(tmp_path / "mid_act_depthwise", [({"mid_act": "none"}, [0.90, 0.91, 0.92]),
                                                  ({"mid_act": "relu"}, [0.88, 0.89, 0.905]),
                                                  ({"mid_act": "elu"}, [0.89, 0.90, 0.91])])
    _study_table(tmp_path / "mid_act_deep", [({"mid_act": "none"}, [0.90, 0.91, 0.92]),
                                             ({"mid_act": "relu"}, [0.92, 0.93, 0.94]),
                                             ({"mid_act": "elu"}, [0.91, 0.92, 0.93])])
    ablation = next(a for a in campaign.ABLATIONS if "mid_act_deep" in a.studies)
    tables = {s: campaign.load(tmp_path / s) for s in ablation.studies}
    family = campaign.family_table(ablation, tables, seeds=3).set_index("comparison")
    interaction = family.loc["interaction: (relu - none at 16 ch) - (relu - none at depthwise)"]
    assert interaction["diff"] == pytest.approx(0.02 - (-0.0183333), abs=1e-6) and interaction["n"] == 3
    assert np.isnan(interaction["mcnemar_p"])
    assert family.loc["relu - none at depthwise", "verdict"] in ("reproduced", "inconclusive")
    missing = campaign.family_table(ablation, {"mid_act_deep": tables["mid_act_deep"]}, seeds=3)
    assert set(missing.set_index("comparison").loc[["relu - none at depthwise"], "verdict"]) == {
        "interim (0 of 3 seeds)"}  # its study not run yet: queued, not "not tested"


def test_the_search_section_shows_the_front_and_the_retrained_configurations(tmp_path):
    assert "Not run yet." in campaign.search_section(tmp_path)
    _study_table(tmp_path / "search", [({"state": "FAIL"}, [0.0])], seeds=(0,))  # interrupted: no plot drawn yet
    lines = campaign.search_section(tmp_path)
    assert "`search`: no trial finished yet." in lines and not [line for line in lines if line.startswith("![")]
    shutil.rmtree(tmp_path / "search")
    searched = [("1/4/all", 0.75, 0.91, 3e7), ("all", 1.5, 0.93, 6e7), ("4", 1.5, 0.90, 7e7),  # 2: dominated
                ("all", 1.5, 0.925, 6e7)]  # trained again: shown once, at its best trial
    (tmp_path / "search").mkdir()
    pd.DataFrame([{"trial": i, "state": "COMPLETE", "model": "continuum_small", "segments": s, "width": w,
                   "val_acc": acc, "flops": flops, "params": 1000, "train_s": 1800.0, "threads": 1}
                  for i, (s, w, acc, flops) in enumerate(searched)],
                 columns=TRIAL_COLUMNS).to_csv(tmp_path / "search" / "trials.csv", index=False)
    text = "\n".join(campaign.search_section(tmp_path))
    assert "`search` (4 trials of 3 configurations, 2.0 core-hours)" in text
    assert "`search_retrain`: not run yet." in text
    front = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("|")]
    assert front[2:] == ["1 (0.9300), 3 (0.9250)", "0"]  # best validation accuracy first
    assert "0.9300 | 60,000,000 |" in text and "0.9250 | 60,000,000 |" not in text
    _study_table(tmp_path / "search_retrain", [({"segments": "all", "width": 1.5}, [0.92, 0.93])])
    text = "\n".join(campaign.search_section(tmp_path))
    header = [line for line in text.splitlines() if line.startswith("|")][-3]
    assert {"segments", "width"} <= {c.strip() for c in header.split("|")}  # one so far: named by the knobs
    shutil.rmtree(tmp_path / "search_retrain")
    _study_table(tmp_path / "search_retrain", [({"segments": "all", "width": 1.5}, [0.92, 0.93, 0.925]),
                                               ({"segments": "1/4/all", "width": 0.75}, [0.90, 0.91, 0.905])])
    text = "\n".join(campaign.search_section(tmp_path))
    assert "`search_retrain` (6 trials, 6.0 core-hours; test accuracy" in text and "1/4/all" in text


def test_an_interior_optimum_is_shown_only_where_a_count_beats_both_ends(tmp_path):
    seeds = tuple(range(6))
    flat = [0.900, 0.905, 0.910, 0.915, 0.920, 0.925]
    arms = {"1": flat, "2": flat, "4": [a + 0.03 for a in flat], "8": [a + 0.01 for a in flat], "16": flat,
            "32": flat, "all": [a + 0.02 for a in flat]}
    _study_table(tmp_path / "spectrum_params", [({"segments": k}, accs) for k, accs in arms.items()], seeds=seeds,
                 images=400)
    tables = {"spectrum_params": campaign.load(tmp_path / "spectrum_params")}
    family = campaign.family_table(campaign.interior_family("spectrum_params"), tables, seeds=6)
    assert len(family) == 10 and set(family["verdict"]) == {"not tested"}  # a finding, not a paper claim
    assert campaign.interior_outcome(family, 6) == "shown at segments 4"  # 8 beats 1, not all
    _pilot_table(tmp_path / "pilot", [-0.020, -0.022, -0.018])
    _pilot_table(tmp_path / "pilot_long", [-0.021, -0.023, -0.019])
    text = "\n".join(_section(campaign.ABLATIONS[0], tmp_path, _registered_seeds(tmp_path)))
    assert "Interior optimum (pre-registered; 10 comparisons" in text and "**shown at segments 4**" in text
    assert "| 4 vs 1       |   6 |           +3.00 | [+3.00, +3.00] |" in text  # signed points, also when none is "–"
    assert "| 2 vs all     |   6 |           -2.00 | [-2.00, -2.00] |" in text
    glance = _glance(tmp_path)  # the answers first, the same
    assert "- Interior optimum (`spectrum_params`, pre-registered): **shown at segments 4**." in glance
    assert "the highest test accuracy at segments 4; the accuracy-FLOPs front at segments 4." in "\n".join(glance)
    del arms["4"]
    _study_table(tmp_path / "flat" / "spectrum_params", [({"segments": k}, accs) for k, accs in arms.items()],
                 seeds=seeds, images=400)
    missing = campaign.family_table(campaign.interior_family("spectrum_params"),
                                    {"spectrum_params": campaign.load(tmp_path / "flat" / "spectrum_params")}, 6)
    assert campaign.interior_outcome(missing, 6) == "interim: waits for every arm's paired seeds"
    short = campaign.family_table(campaign.interior_family("spectrum_params"), tables, seeds=7)
    assert campaign.interior_outcome(short, 7) == "interim: waits for every arm's paired seeds"
    assert campaign.interior_outcome(family, None) == "interim: waits for every arm's paired seeds"  # no pilot yet
    arms["4"] = flat
    _study_table(tmp_path / "none" / "spectrum_params", [({"segments": k}, accs) for k, accs in arms.items()],
                 seeds=seeds, images=400)
    none = campaign.family_table(campaign.interior_family("spectrum_params"),
                                 {"spectrum_params": campaign.load(tmp_path / "none" / "spectrum_params")}, 6)
    assert campaign.interior_outcome(none, 6) == "no interior optimum shown"


def test_each_ablation_study_takes_its_rates_from_its_own_lr_study_and_the_report_shows_them(tmp_path):
    files = Path(__file__).resolve().parents[1] / "experiments" / "campaign"
    seeds = _registered_seeds(files.parents[1] / "results" / "campaign")  # what the committed pilot fixed
    for study in (study for ablation in campaign.ABLATIONS for study in ablation.studies):
        settings = tomllib.loads((files / f"{study}.toml").read_text())
        assert settings["lr"] == "tuned" and settings["lr_study"] == study + campaign.LR_STUDY_SUFFIX
        assert settings["seeds"] == list(range(seeds))  # paired: every ablation runs the pilot's seeds
        rates = tomllib.loads((files / f"{settings['lr_study']}.toml").read_text())
        assert rates["lr"] == list(campaign.LR_GRID) and rates["lr_extend"] is True  # the protocol's grid, edge rule
    order = next(a for a in campaign.ABLATIONS if a.studies == ("order",))
    assert "Learning rates (`order_lr`): not run yet." in _section(order, tmp_path, seeds=None)
    _study_table(tmp_path / "order_lr", [({"order": "depthwise_first", "lr": 0.05}, [0.91]),
                                         ({"order": "depthwise_first", "lr": 0.1}, [0.92]),
                                         ({"order": "pointwise_first", "lr": 0.05}, [0.90])], seeds=(0,))
    lines = _section(order, tmp_path, seeds=None)
    assert lines[4].startswith("Learning rates (`order_lr`, 3 trials finished, 3.0 core-hours; validation accuracy "
                               "after the last epoch, seed 0; -: not finished yet, and the chosen rate may change")
    assert lines[6].splitlines()[-2:] == ["| all        | depthwise_first |    0.9100 |   0.9200 |      0.1000 |",
                                          "| all        | pointwise_first |    0.9000 |   -      |      0.0500 |"]
    edge = [({"order": "depthwise_first", "lr": lr}, [acc]) for lr, acc in ((0.025, 0.90), (0.05, 0.91), (0.1, 0.92))]
    inside = [({"order": "pointwise_first", "lr": lr}, [acc]) for lr, acc in ((0.025, 0.90), (0.05, 0.92), (0.1, 0.91))]
    _study_table(tmp_path / "waiting" / "order_lr", edge + inside, seeds=(0,))
    header = _section(order, tmp_path / "waiting", seeds=None)[4]
    assert header.endswith("seed 0; best at the grid's edge, waiting for the step beyond it (`lr_extend`): "
                           "segments=all, order=depthwise_first):")
    assert arm_label(["segments", "width", "width_divisor"], (8, 1.1111111111154859, 8)) == \
        "segments=8, width=1.1111, width_divisor=8"  # a matched width as the tables print it
    step = ({"order": "depthwise_first", "lr": 0.2}, [0.91])
    _study_table(tmp_path / "stepped" / "order_lr", [*edge, step, *inside], seeds=(0,))
    lines = _section(order, tmp_path / "stepped", seeds=None)
    assert lines[4].endswith("seed 0; rates beyond the grid: the one step `lr_extend` takes for an arm best at the "
                             "grid's edge (-: an arm best inside it takes none)):")
    assert lines[6].splitlines()[-2:] == [
        "| all        | depthwise_first |     0.9000 |    0.9100 |   0.9200 |   0.9100 |      0.1000 |",
        "| all        | pointwise_first |     0.9000 |    0.9200 |   0.9100 |   -      |      0.0500 |"]
    lines = _section(order, tmp_path, seeds=None)
    assert lines[-2:] == ["Not run yet.", ""]
    assert [ablation.arm_columns(study) for ablation in campaign.ABLATIONS for study in ablation.studies] == [
        ["segments"], ["segments"], ["order", "segments"], ["mid_act"], ["mid_act"], ["residual"], ["model"]]
    residual = next(a for a in campaign.ABLATIONS if a.studies == ("residual",))
    _study_table(tmp_path / "residual_lr", [({"lr": 0.025}, [0.92]), ({"lr": 0.1, "state": "RUNNING"}, [0.0])],
                 seeds=(0,))  # one arm, one rate finished: the arm is still named by its own column
    lines = _section(residual, tmp_path, seeds=None)
    assert lines[4].startswith("Learning rates (`residual_lr`, 1 trial finished, 1.0 core-hours;")
    assert lines[6].splitlines()[0] == "| residual   |   lr 0.025 |   chosen lr |"
    _study_table(tmp_path / "residual", [({"state": "RUNNING"}, [0.0])], seeds=(0,))
    lines = _section(residual, tmp_path, seeds=3)
    assert "`residual`: no trial finished yet." in lines
    assert not [line for line in lines if line.startswith("![")]  # no link to a plot the sweep has not drawn
    _study_table(tmp_path / "one_arm" / "residual", [({}, [0.94]), ({"state": "RUNNING"}, [0.0])], seeds=(0, 1))
    lines = _section(residual, tmp_path / "one_arm", seeds=3)  # the finished trial's arm is named
    table = lines[lines.index("`residual` (1 trial, 1.0 core-hours; test accuracy, mean and 95 % interval over "
                              "seeds):") + 2].splitlines()
    assert table[0].split("|")[1:4] == [" model           ", " segments   ", " residual   "]
    assert table[2].split("|")[3:5] == [" True       ", "   1 "]
    assert "![residual curves](residual/curves.png)\n" in lines  # drawn once a trial finished
    _study_table(tmp_path / "spectrum_params_lr", [({"segments": k, "lr": 0.05}, [0.9]) for k in ("16", "all", "2")],
                 seeds=(0,))
    rows = campaign.lr_lines(tmp_path, "spectrum_params_lr", ["segments"])[2].splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == ["2", "16", "all"]  # by number, depthwise last


def test_the_campaign_script_runs_its_studies_under_any_root(tmp_path):
    """``run.sh STUDY ... -- OPTION ...``: the studies in one sweep, the options for all (each file's journal follows
    ``--out``: ``test_settings``)."""
    root = Path(__file__).resolve().parents[1]
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$@"\n')  # shows the sweep's command line instead of running it
    fake.chmod(0o755)
    script = root / "experiments" / "campaign" / "run.sh"

    def command(*args: str) -> str:
        done = subprocess.run(["bash", str(script), *args], env={**os.environ, "PYTHON": str(fake)},
                              capture_output=True, text=True, check=True)
        return done.stdout.splitlines()[1]  # between the start and done lines

    assert command("order_lr", "order", "--", "--out", "results/gpu", "--device", "cuda") == (
        "-m continuum.sweep --config experiments/campaign/order_lr.toml --config experiments/campaign/order.toml "
        "--out results/gpu --device cuda --quiet")
    assert command() == ("-m continuum.sweep --config experiments/campaign/pilot_lr.toml --config "
                         "experiments/campaign/pilot.toml --config experiments/campaign/pilot_long.toml --quiet")
    assert command("ablations").count("--config") == 16


def test_each_study_says_how_it_ran_from_its_finished_trials():
    record = {"model": "continuum_small", "depths": "4/4/4", "dataset": "fashion-mnist", "train_size": 55000,
              "val_size": 5000, "epochs": 15, "batch_size": 128, "recipe": "cosine", "warmup_epochs": 1.0,
              "weight_decay": 5e-4, "precision": "fp32"}
    trials = pd.DataFrame([record | {"trial": 0, "state": "COMPLETE", "seed": 1, "device": "cpu B"},
                           record | {"trial": 1, "state": "COMPLETE", "seed": 0, "device": "cpu A"},
                           record | {"trial": 2, "state": "FAIL", "seed": 2, "device": "cpu C"}])  # not counted
    assert campaign.protocol_line("residual", trials) == (
        "`residual` ran (its table's record): continuum_small with per-stage depths 4/4/4; fashion-mnist, 55,000 "
        "training and 5,000 validation images; 15 epochs, batch 128, cosine schedule with 1 warm-up epoch, weight "
        "decay 0.0005, fp32; seeds 0, 1; cpu A / cpu B.")
    plain = trials.assign(depths="none", warmup_epochs=0.0).drop(columns="precision")  # an older table: no column
    assert campaign.protocol_line("order", plain).startswith("`order` ran (its table's record): continuum_small; ")
    assert "cosine schedule with 0 warm-up epochs, weight decay 0.0005, –; seeds" in campaign.protocol_line(
        "order", plain)
