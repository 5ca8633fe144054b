"""The campaign's pre-registered rules (``experiments/PROTOCOL.md``) as code: the verdict vocabulary, the pilot's
training-length check and seed count, and the report they write.

    python -m continuum.campaign results/campaign --report results/README.md   # the report from the tables
    python -m continuum.campaign results/gpu_campaign      # writes results/gpu_campaign/README.md

Every number in the report is recomputed from the studies' ``trials.csv``; nothing is typed in.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

import pandas as pd
from scipy import stats

from continuum.analysis import Comparison, arm_label, best_rate, compare, holm, mcnemar_test, paired_sides, \
    pareto_front, sort_arms, summarize, varying_columns
from continuum.arm_latency import LATENCY_FILE
from continuum.files import atomic_write
from continuum.results import TableError, load
from continuum.sweep.record import POINT_COLUMNS, decode_correct

ALPHA = 0.05
"""Family-wise error rate of each ablation's family of comparisons (Holm), and the level of every test."""

MARGIN = 0.01
"""Equivalence margin: ± 1 accuracy point."""

LENGTH_TOLERANCE = 0.003
"""The pilot's length check: the two arms' difference may move by less than 0.3 points from 1x to 3x the length."""

HALF_WIDTH = 0.01
"""Seeds are chosen so that a primary comparison's 95 % interval has at most this half-width (1 point)."""

MIN_SEEDS = 3
"""Fewest seeds per arm, whatever the pilot's spread."""

MAX_SEEDS = 10
"""Most seeds per arm this machine can afford; where the target needs more, the report says the target is not met."""

VERDICTS = {
    "reproduced": "the paper's direction, Holm-adjusted p < 0.05 (the interval excludes 0 on the paper's side)",
    "contradicted": "a significant difference (Holm-adjusted p < 0.05) against the paper's claim",
    "equivalent within ±1 pt": "not significantly different, and TOST within ±1 point with Holm-adjusted p < 0.05",
    "inconclusive": "neither a significant difference nor equivalence",
    "not tested": "the claim's conditions are not in these experiments",
}
"""The only words a verdict may use, each with its rule."""

INTERIM = "interim"
INTERIM_RULE = ("not a verdict: some comparison of the family has fewer paired seeds than the pilot fixed, so no "
                "Holm-adjusted p and no verdict yet (the n, difference, interval and unadjusted p are shown)")
"""What a comparison reads while its family is incomplete (``experiments/PROTOCOL.md``, note of 2026-12-05)."""

LR_GRID = (0.025, 0.05, 0.1)
"""The protocol's learning-rate grid, which every ``NAME_lr`` study runs (with ``lr_extend``: one factor-2 step beyond
the edge where an arm is best there)."""

LR_STUDY_SUFFIX = "_lr"
"""An ablation study ``NAME`` takes each arm's learning rate from the study ``NAME_lr`` (``experiments/campaign``)."""

CLAIMS = ("higher", "lower", "equal")
"""What the paper claims of ``other`` against ``baseline``: better, worse, or no difference."""


def verdict(comparison: Comparison | None, p: float, p_equivalent: float, claim: str | None) -> str:
    """The verdict on a claim, by the rules of :data:`VERDICTS`.

    Args:
        comparison: the paired comparison (other - baseline); ``None``: not run.
        p: its Holm-adjusted p-value of "no difference".
        p_equivalent: its Holm-adjusted TOST p-value.
        claim: one of :data:`CLAIMS`; ``None``: the paper claims nothing testable here.

    Raises:
        ValueError: an unknown claim.
    """
    if claim is not None and claim not in CLAIMS:
        raise ValueError(f"claim={claim!r} is not valid; choose one of {', '.join(CLAIMS)}")
    if comparison is None or claim is None:
        return "not tested"
    if p < ALPHA:
        agrees = {"higher": comparison.diff > 0, "lower": comparison.diff < 0, "equal": False}[claim]
        return "reproduced" if agrees else "contradicted"
    if p_equivalent < ALPHA:
        return "equivalent within ±1 pt"
    return "inconclusive"


class LengthCheck(NamedTuple):
    """The pilot's training-length check.

    Args:
        short: the arms' paired comparison at the chosen length.
        long: the same at 3x the length.
        same_ranking: both differences have the same sign.
        moved: how far the difference moved (points as a fraction), long - short.
        passed: same ranking and ``|moved| <`` :data:`LENGTH_TOLERANCE`.
    """

    short: Comparison
    long: Comparison
    same_ranking: bool
    moved: float
    passed: bool


def length_check(short: Comparison, long: Comparison, tolerance: float = LENGTH_TOLERANCE) -> LengthCheck:
    """Whether the ranking of two arms and their difference hold from the chosen length to 3x it."""
    same = (short.diff > 0) == (long.diff > 0)
    moved = long.diff - short.diff
    return LengthCheck(short, long, same, moved, same and abs(moved) < tolerance)


def seeds_needed(sd: float, half_width: float = HALF_WIDTH, level: float = 0.95) -> int:
    """The fewest seeds (at least :data:`MIN_SEEDS`) whose paired t-interval has at most ``half_width`` when the
    per-seed differences have standard deviation ``sd``; more than :data:`MAX_SEEDS` is returned as it is, for the
    report to say the target is out of reach."""
    n = MIN_SEEDS
    while stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n) > half_width and n < 1000:
        n += 1
    return n


def _table_or_none(root: Path, study: str) -> pd.DataFrame | None:
    """A study's trials, or ``None`` when it has not written its table yet.

    Raises:
        TableError: the table is there but damaged (cut off, garbled, not a trials table): a report that called
            the study not run would hide that.
    """
    try:
        return load(root / study)
    except FileNotFoundError:
        return None


def core_hours(trials: pd.DataFrame) -> float:
    """Core-hours of training and validation behind a study's finished trials (epochs a trial resumed from an
    interrupted one's saved state included; work lost in failed trials not)."""
    done = trials[trials["state"] == "COMPLETE"]
    return (done["train_s"] * done["threads"].fillna(1)).sum() / 3600


def shown_arm_columns(trials: pd.DataFrame, arm_columns: Sequence[str]) -> list[str]:
    """The columns a table of ``trials`` names its arms by: ``arm_columns`` (even while one arm alone has trials) and
    every other column that varies (a matched width, a rate), in the trials table's order."""
    varying = varying_columns(trials)
    return [c for c in POINT_COLUMNS if c in arm_columns or c in varying]


def lr_lines(root: Path, study: str, arm_columns: Sequence[str], grid: Sequence[float] = LR_GRID) -> list[str]:
    """The learning-rate study's validation accuracy per arm and rate (rates past the grid's edge where an arm was
    best there: ``lr_extend``), and the rate each arm takes (the best mean, ties to the smaller: what ``--lr tuned``
    reads), with what may still change it: grid rates not finished yet, or the step beyond the grid's edge not taken
    yet by an arm best there.

    Args:
        root: the campaign's results root.
        study: the learning-rate study (a folder under ``root``).
        arm_columns: the columns that name its arms, shown even while one arm alone has trials; any other column
            that varies besides the rate (a matched width) is shown too.
        grid: the protocol's rates.
    """
    trials = _table_or_none(root, study)
    if trials is None:
        return [f"Learning rates (`{study}`): not run yet.", ""]
    done = trials[trials["state"] == "COMPLETE"]
    if done.empty:
        return [f"Learning rates (`{study}`): no trial finished yet.", ""]
    arms = [c for c in shown_arm_columns(trials, arm_columns) if c != "lr"]
    table = done.pivot_table(index=arms, columns="lr", values="val_acc", aggfunc="mean")
    chosen = table.apply(best_rate, axis=1).rename("chosen lr")
    in_grid = table[[rate for rate in table.columns if rate in grid]]
    complete = in_grid.notna().sum(axis=1) == len(grid)
    at_edge = in_grid.apply(best_rate, axis=1).isin((min(grid), max(grid)))
    stepped = table[[rate for rate in table.columns if rate not in grid]].notna().any(axis=1)
    waiting = [arm_label(arms, arm if isinstance(arm, tuple) else (arm,))
               for arm in table.index[complete & at_edge & ~stepped]]
    notes = []
    if not complete.all():
        notes.append("-: not finished yet, and the chosen rate may change until every rate of the grid has")
    if waiting:
        notes.append(f"best at the grid's edge, waiting for the step beyond it (`lr_extend`): {'; '.join(waiting)}")
    if len(table.columns) > len(in_grid.columns):
        notes.append("rates beyond the grid: the one step `lr_extend` takes for an arm best at the grid's edge "
                     "(-: an arm best inside it takes none)")
    shown = sort_arms(table.rename(columns=lambda lr: f"lr {lr:g}").join(chosen).reset_index(), arms)
    return [f"Learning rates (`{study}`, {_count(len(done), 'trial')} finished, {core_hours(trials):.1f} "
            f"core-hours; validation accuracy after the last epoch, seed 0{''.join('; ' + note for note in notes)}):",
            "", _markdown(shown, missingval="-"), "", protocol_line(study, trials), ""]


PILOT_LENGTHS = {"pilot": 5, "pilot_long": 15, "pilot_longer": 45}
"""The pilot's studies (segments 1 vs all, paired seeds) in order, each with its training length in epochs, each 3x
the one before. The first two decide the campaign's length (:func:`seed_plan`); the third checks the length chosen
after a failed first check (:func:`convergence_lines`; ``experiments/PROTOCOL.md``, note of 2026-12-06)."""

SHORT_PILOT, LONG_PILOT, LONGER_PILOT = PILOT_LENGTHS
"""The pilot studies by role: the campaign's first length, 3x it, 9x it."""

PILOT_COLUMN = "segments"
"""What differs between the pilot's two arms (1 and all)."""

PILOT_METRIC = "val_acc"
"""What the pilot compares: the validation split's accuracy (the test split decides nothing)."""


PilotArms = dict[str, tuple[pd.DataFrame, pd.Series, pd.Series]]
"""Each pilot study (by name): its trials and its two arms (segments 1, all), one value of :data:`PILOT_METRIC` per
paired seed."""


class SeedPlan(NamedTuple):
    """What the pilot fixes.

    Args:
        check: the length check.
        study: the pilot study at the campaign's length, whose spread sets the seeds.
        seeds: the seeds per arm its spread needs (:func:`seeds_needed`; may exceed :data:`MAX_SEEDS`).
    """

    check: LengthCheck
    study: str
    seeds: int


def _check(comparisons: dict[str, Comparison], short: str, long: str) -> LengthCheck | None:
    """The length check of two pilot studies (by name in ``comparisons``); ``None`` while either lacks its paired seeds
    (``long`` fewer than ``short``)."""
    if not {short, long} <= set(comparisons) or comparisons[long].n < comparisons[short].n:
        return None
    return length_check(comparisons[short], comparisons[long])


def seed_plan(comparisons: dict[str, Comparison]) -> SeedPlan | None:
    """The length check and the seed count, from the pilot studies' comparisons (by study name); ``None`` while
    either of the two first pilot studies lacks its paired seeds."""
    if (check := _check(comparisons, SHORT_PILOT, LONG_PILOT)) is None:
        return None
    study = SHORT_PILOT if check.passed else LONG_PILOT  # the seeds come from the campaign's length
    return SeedPlan(check, study, seeds_needed(comparisons[study].sd))


class Pilot(NamedTuple):
    """The pilot studies, read and compared once per report (:func:`read_pilot`).

    Args:
        arms: the pilot studies with a table, by name.
        comparisons: the paired comparison (all - 1) of each of them with 2 or more paired seeds, by name.
        plan: what they fix (:func:`seed_plan`); ``None`` before they have fixed it.
    """

    arms: PilotArms
    comparisons: dict[str, Comparison]
    plan: SeedPlan | None


def read_pilot(root: Path) -> Pilot:
    """The pilot studies with a table under ``root`` (the campaign's results root), their comparisons and plan."""
    arms = {study: (trials, *paired_sides(trials, PILOT_COLUMN, "1", "all", PILOT_METRIC))
            for study in PILOT_LENGTHS if (trials := _table_or_none(root, study)) is not None}
    comparisons = {study: compare(a, b, MARGIN) for study, (_, a, b) in arms.items() if len(a) >= 2}
    return Pilot(arms, comparisons, seed_plan(comparisons))


def registered_seeds(pilot: Pilot) -> int | None:
    """The paired seeds every arm of an ablation runs: the pilot's count, at most :data:`MAX_SEEDS`; ``None`` before
    the pilot (:func:`read_pilot`) has fixed it."""
    return None if pilot.plan is None else min(pilot.plan.seeds, MAX_SEEDS)


def _check_line(name: str, check: LengthCheck, outcome: str) -> str:
    """One check's line of the report: its name, ranking, how far the difference moved, and ``outcome``."""
    return (f"- {name} ({'same' if check.same_ranking else 'different'} ranking, difference moved "
            f"{100 * check.moved:+.2f} points; limit {100 * LENGTH_TOLERANCE:.1f}): **{outcome}**.")


def convergence_lines(pilot: Pilot) -> list[str]:
    """The report's lines on convergence after a failed length check: the ablations train
    ``PILOT_LENGTHS[LONG_PILOT]`` epochs, and the same check from there to ``PILOT_LENGTHS[LONGER_PILOT]`` shows
    convergence or not; it decides nothing that has run (``experiments/PROTOCOL.md``, note of 2026-12-06).

    Args:
        pilot: the pilot studies (:func:`read_pilot`).
    """
    short, long, longer = (PILOT_LENGTHS[study] for study in (SHORT_PILOT, LONG_PILOT, LONGER_PILOT))
    check = _check(pilot.comparisons, LONG_PILOT, LONGER_PILOT)
    if check is None:
        finished = len(pilot.arms[LONGER_PILOT][1]) if LONGER_PILOT in pilot.arms else 0
        return [f"- **Convergence is not shown**: the ablations train {long} epochs, with the learning rates chosen "
                f"at {short}; the same check from {long} to {longer} epochs (`{LONGER_PILOT}`) waits for its paired "
                f"seeds ({finished} of {pilot.comparisons[LONG_PILOT].n} finished)."]
    name = f"Convergence check, {long} to {longer} epochs"
    if check.passed:
        return [_check_line(name, check, f"passed: convergence shown at {long} epochs")]
    return [_check_line(name, check, f"failed: convergence is not shown at {long} epochs"),
            f"- The ablations were not rerun at {longer} epochs: their rankings may still move with training length."]


def length_lines(pilot: Pilot) -> list[str]:
    """The length check's line and, after a failed one, the convergence check's (:func:`convergence_lines`); none
    before the pilot (:func:`read_pilot`) has fixed them."""
    if (plan := pilot.plan) is None:
        return []
    outcome = f"{'passed' if plan.check.passed else 'failed'}: {PILOT_LENGTHS[plan.study]} epochs"
    checked = [_check_line("Length check", plan.check, outcome)]
    return checked if plan.check.passed else checked + convergence_lines(pilot)


def pilot_section(root: Path, pilot: Pilot) -> list[str]:
    """The report's pilot section: per-arm results at each length, the length check, the seed count and, after a
    failed length check, the convergence check.

    Args:
        root: the campaign's results root (``pilot_lr`` beneath it).
        pilot: the pilot studies read from it (:func:`read_pilot`).
    """
    lines = ["## Pilot: training length and seeds", ""]
    lines += lr_lines(root, "pilot_lr", [PILOT_COLUMN])
    arms, comparisons = pilot.arms, pilot.comparisons
    for study, epochs in PILOT_LENGTHS.items():
        label = f"{epochs} epochs"
        if study not in arms:
            lines.append(f"- {label} (`{study}`): not run yet.")
            continue
        trials, a, b = arms[study]
        if len(a) < 2:
            lines.append(f"- {label} (`{study}`): {_count(len(a), 'paired seed')} finished; the check needs 2 or more.")
            continue
        c = comparisons[study]
        lines.append(f"- {label} (`{study}`, n = {c.n} paired seeds, {core_hours(trials):.1f} core-hours): "
                     f"{PILOT_METRIC} segments=1 {a.mean():.4f}, "
                     f"all {b.mean():.4f}; all - 1 = {100 * c.diff:+.2f} points [{100 * c.ci_low:+.2f}, "
                     f"{100 * c.ci_high:+.2f}], sd of the paired differences {100 * c.sd:.2f} points.")
    lines.append("")
    for study, (trials, _, _) in arms.items():
        lines += [protocol_line(study, trials), ""]
    plan = pilot.plan
    if plan is None and {SHORT_PILOT, LONG_PILOT} <= set(comparisons):
        lines.append(f"- Length check: waits for `{LONG_PILOT}`'s other paired seeds ({comparisons[LONG_PILOT].n} "
                     f"of {comparisons[SHORT_PILOT].n} finished); no verdict, and no seed count, before that.")
    elif plan is not None:
        _, chosen, n = plan
        lines += length_lines(pilot)
        reach = "" if n <= MAX_SEEDS else f" (more than this machine's {MAX_SEEDS}: the ±1-point target is not met)"
        lines.append(f"- Seeds (`{chosen}`): sd {100 * comparisons[chosen].sd:.2f} points -> {n} seeds per arm for a "
                     f"95 % half-width of at most {100 * HALF_WIDTH:.0f} point{reach}.")
    else:
        lines.append("- Length check and seed count: wait for both pilot studies.")
    return lines + [""]


class Claim(NamedTuple):
    """One pre-registered comparison: in ``study``, the trials where ``where`` holds, ``column == other`` against
    ``column == baseline``, paired by seed.

    Args:
        label: how the report names it.
        study: the study (a folder under the campaign's root).
        column: the column that differs between the arms.
        baseline: its value in the baseline arm (as text).
        other: its value in the other arm.
        claim: what the paper claims of other - baseline (:data:`CLAIMS`); ``None``: a finding, not a claim.
        where: other columns' values both arms share (as text), e.g. ``{"segments": "all"}``.
        minus: for an interaction, the comparison whose per-seed differences are subtracted from this one's.
    """

    label: str
    study: str
    column: str
    baseline: str
    other: str
    claim: str | None
    where: tuple[tuple[str, str], ...] = ()
    minus: Claim | None = None


class Ablation(NamedTuple):
    """One ablation of the protocol: its question, its studies, its family of comparisons (Holm within it), what it
    cannot say, and the plots (each study's, written by the sweep) the report shows."""

    name: str
    question: str
    studies: tuple[str, ...]
    family: tuple[Claim, ...]
    limitations: str
    plots: tuple[str, ...] = ("curves.png",)

    def arm_columns(self, study: str) -> list[str]:
        """The columns that name ``study``'s arms: the column each of its claims compares and those its ``where``
        fixes, in the order the claims name them."""
        return list(dict.fromkeys(column for claim in self.family if claim.study == study
                                  for column in (claim.column, *(name for name, _ in claim.where))))


SPECTRUM_COUNTS = ("1", "2", "4", "8", "16", "32")
INTERIOR_COUNTS = ("2", "4", "8", "16", "32")


def interior_family(study: str) -> Ablation:
    """The pre-registered test for an interior optimum in a spectrum study: each interior count against both ends
    (10 comparisons, Holm across them). Not a paper claim: its outcome follows :func:`interior_outcome`."""
    return Ablation(f"Interior optimum (`{study}`)", "Is some count between 1 and all better than both ends?",
                    (study,), tuple(Claim(f"{k} vs {end}", study, "segments", end, k, None)
                                    for k in INTERIOR_COUNTS for end in ("1", "all")), "")


def interior_outcome(family: pd.DataFrame, seeds: int | None) -> str:
    """The interior-optimum rule: shown at each count better than segments 1 and than all, both with Holm-adjusted
    p < :data:`ALPHA`; else not shown (waiting while the family is incomplete: :func:`family_complete`).

    Args:
        family: :func:`family_table` of :func:`interior_family`.
        seeds: the paired seeds per comparison the pilot fixed (:func:`registered_seeds`); ``None``: not fixed yet.
    """
    if not family_complete(family["n"], seeds):
        return f"{INTERIM}: waits for every arm's paired seeds"
    better = family.assign(count=[label.split(" vs ")[0] for label in family["comparison"]],
                           won=(family["p_holm"] < ALPHA) & (family["diff"] > 0)).groupby("count", sort=False)["won"]
    winners = [count for count, won in better.all().items() if won]
    return f"shown at segments {', '.join(winners)}" if winners else "no interior optimum shown"


def interior_lines(family: pd.DataFrame, seeds: int | None) -> list[str]:
    """The report's lines on the interior-optimum test of a spectrum study (``family``: :func:`family_table` of its
    :func:`interior_family`; ``seeds``: :func:`registered_seeds`)."""
    return [f"Interior optimum (pre-registered; {len(family)} comparisons, Holm, paired by seed, test accuracy): "
            f"**{interior_outcome(family, seeds)}**.", "",
            _in_points(family, ["comparison", "n", POINTS_COLUMN, "95 % CI", "p", "p_holm"]), ""]


COSTS = {"FLOPs": "flops", "latency": "latency_ms"}
"""The costs a spectrum study's accuracy is weighed against (each with its Pareto front), by the column holding
each: FLOPs per image, and the inference latency measured on a quiet machine (``latency.csv``)."""


def cost_lines(study: str, root: Path, trials: pd.DataFrame) -> list[str]:
    """Where a spectrum study's arms are best: mean test accuracy against FLOPs and against quiet-machine inference
    latency (``latency.csv``, written by ``python -m continuum.arm_latency``), each accuracy-cost Pareto front
    marked, and a line naming the most accurate arm and both fronts; none before a trial has finished.

    Args:
        study: the spectrum study.
        root: the campaign's results root.
        trials: its trials table.
    """
    if not (trials["state"] == "COMPLETE").any():
        return []
    summary = summarize(trials, metric="test_acc").astype({"segments": str})
    arms = summary[[c for c in ("segments", "test_acc_mean", "n", "width", "params", "flops") if c in summary]]
    path = root / study / LATENCY_FILE
    measured = pd.read_csv(path, dtype={"segments": str}) if path.exists() else None
    if measured is not None:
        arms = arms.merge(measured[["segments", "latency_ms"]], on="segments", how="left")
    best = [f"the highest test accuracy at segments {arms.loc[arms['test_acc_mean'].idxmax(), 'segments']}"]
    for cost, column in COSTS.items():
        if column in arms and arms[column].notna().any():
            front = pareto_front(arms, "test_acc_mean", column)
            best.append(f"the accuracy-{cost} front at segments {', '.join(front['segments'])}")
            arms[f"{cost} front"] = ["yes" if i in front.index else "" for i in arms.index]
    lines = [f"Where `{study}` is best (means over seeds; the comparisons above say which differences are beyond "
             f"noise): {'; '.join(best)}.", ""]
    if measured is None:
        return lines + ["Test accuracy against FLOPs per image, the accuracy-FLOPs front marked:", "",
                        _markdown(arms), "", "Quiet-machine latency: not measured yet "
                        f"(`python -m continuum.arm_latency {root / study}`).", ""]
    first = measured.iloc[0]
    return lines + [f"Test accuracy against FLOPs per image and against inference latency on a quiet machine "
                    f"({first['device']}, batch {first['batch_size']}, median ms, measured {first['measured']}), "
                    "each accuracy-cost front marked:", "", _markdown(arms), ""]


def _spectrum(study: str, budget: str) -> Ablation:
    return Ablation(
        f"The spectrum at matched {budget} (`{study}`)",
        "Where on the continuum is accuracy best at a fixed budget? The paper: depthwise (all) is best.",
        (study,),
        tuple(Claim(f"all vs {k}", study, "segments", k, "all", "higher") for k in SPECTRUM_COUNTS),
        f"Fashion-MNIST at 28 px and small nets matched in {budget} (each arm's size above), not ImageNet; one "
        "learning-rate grid per arm.",
        ("spectrum.png", "pareto_macs.png", "curves.png"))


SPECTRUM_STUDIES = {"spectrum_params": "parameters", "spectrum_flops": "FLOPs"}
"""The spectrum studies (ablation 1), each with its budget; each has the interior-optimum test too."""

ABLATIONS = (
    *(_spectrum(study, budget) for study, budget in SPECTRUM_STUDIES.items()),
    Ablation("Operation order (`order`)", "Does the order of the 1x1 and the spatial conv matter? The paper: no.",
             ("order",), tuple(Claim(f"pointwise_first vs depthwise_first at segments {s}", "order", "order",
                                     "depthwise_first", "pointwise_first", "equal", (("segments", s),))
                               for s in ("all", "4")),
             "Two points of the continuum only."),
    Ablation("Intermediate activation (`mid_act_depthwise`, `mid_act_deep`)",
             "Does a non-linearity between the two ops hurt in 1-channel-deep spaces and help in deep ones?",
             ("mid_act_depthwise", "mid_act_deep"),
             (*(Claim(f"{act} - none at depthwise", "mid_act_depthwise", "mid_act", "none", act, "lower")
                for act in ("relu", "elu")),
              *(Claim(f"{act} - none at 16 ch/segment", "mid_act_deep", "mid_act", "none", act, "higher")
                for act in ("relu", "elu")),
              Claim("interaction: (relu - none at 16 ch) - (relu - none at depthwise)", "mid_act_deep", "mid_act",
                    "none", "relu", "higher",
                    minus=Claim("", "mid_act_depthwise", "mid_act", "none", "relu", None))),
             "16 channels per segment is the deep end here; the paper's deep spaces were Inception's."),
    Ablation("Residual connections (`residual`)", "Do shortcuts help a deep separable net? The paper: yes.",
             ("residual",), (Claim("on vs off", "residual", "residual", "False", "True", "higher"),),
             "24 separable units on Fashion-MNIST; the paper's 36-layer ImageNet net is not tested."),
    Ablation("Xception vs Inception (`xception_vs_inception`)",
             "At equal parameters, is the Xception-style net better than the Inception-style one? The paper: yes.",
             ("xception_vs_inception",), (Claim("Xception vs Inception", "xception_vs_inception", "model",
                                               "continuum_inception_small", "continuum_small", "higher"),),
             "Small nets for 28 px images stand in for the paper's ImageNet/JFT models."),
)
"""The protocol's ablations and their families, as ``experiments/PROTOCOL.md`` names them."""


def _where(trials: pd.DataFrame, claim: Claim) -> pd.DataFrame:
    """The trials where the claim's shared column values (``where``) hold."""
    for column, value in claim.where:
        trials = trials[trials[column].astype(str) == value]
    return trials


def _sides(claim: Claim, tables: dict[str, pd.DataFrame], metric: str) -> tuple[pd.Series, pd.Series] | None:
    """The claim's two arms, one value per common seed (the interaction: per-seed differences of two claims)."""
    if claim.study not in tables:
        return None
    trials = _where(tables[claim.study], claim)
    a, b = paired_sides(trials, claim.column, claim.baseline, claim.other, metric)
    if claim.minus is None:
        return a, b
    inner = _sides(claim.minus, tables, metric)
    if inner is None:
        return None
    d_inner = inner[1] - inner[0]
    seeds = a.index.intersection(d_inner.index)
    return d_inner[seeds], (b - a)[seeds]


def interim_status(n: int, seeds: int | None) -> str:
    """What a paper claim's comparison reads in place of a verdict while its family is incomplete (:data:`INTERIM`).

    Args:
        n: its paired seeds so far.
        seeds: the paired seeds the pilot fixed (:func:`registered_seeds`); ``None``: not fixed yet.
    """
    if seeds is None:
        return f"{INTERIM} (the pilot has not fixed the seeds)"
    return f"{INTERIM} ({n} of {seeds} seeds)" if n < seeds else f"{INTERIM} (family incomplete)"


def family_complete(counts: Sequence[int], seeds: int | None) -> bool:
    """Whether a family is complete: the pilot has fixed the seeds and every comparison has them.

    Args:
        counts: each comparison's paired seeds.
        seeds: the paired seeds per comparison the pilot fixed (:func:`registered_seeds`); ``None``: not fixed yet.
    """
    return seeds is not None and all(n >= seeds for n in counts)


def family_table(ablation: Ablation, tables: dict[str, pd.DataFrame], seeds: int | None,
                 metric: str = "test_acc") -> pd.DataFrame:
    """One row per comparison of ``ablation``'s family: the paired difference with its interval, p, Holm-adjusted p
    and TOST p, McNemar's pooled per-image p (plain comparisons with stored correctness) and the verdict. While some
    comparison has fewer than ``seeds`` paired seeds, the family is incomplete: no Holm-adjusted p (NaN), and each
    paper claim reads :func:`interim_status` in place of a verdict.

    Args:
        ablation: the ablation.
        tables: its studies' trials tables by study name (a missing study: its comparisons have 0 seeds).
        seeds: the paired seeds per comparison the pilot fixed (:func:`registered_seeds`); ``None``: not fixed yet,
            so the family is incomplete.
        metric: the reported metric.
    """
    rows, tested = [], []
    for claim in ablation.family:
        sides = _sides(claim, tables, metric)
        comparison = compare(*sides, MARGIN) if sides is not None and len(sides[0]) >= 2 else None
        rows.append({"comparison": claim.label, "claim": claim.claim or "-", "n": 0 if sides is None
                     else len(sides[0]), "comparison_": comparison, "mcnemar_p": _mcnemar(claim, tables)})
        if comparison is not None:
            tested.append(len(rows) - 1)
    complete = family_complete([row["n"] for row in rows], seeds)
    adjusted = dict(zip(tested, holm([rows[i]["comparison_"].p for i in tested]))) if complete else {}
    adjusted_eq = dict(zip(tested, holm([rows[i]["comparison_"].p_equivalent for i in tested]))) if complete else {}
    for i, row in enumerate(rows):
        c, claim = row.pop("comparison_"), ablation.family[i].claim
        row |= {"diff": c.diff if c else math.nan, "ci_low": c.ci_low if c else math.nan,
                "ci_high": c.ci_high if c else math.nan, "p": c.p if c else math.nan,
                "p_holm": adjusted.get(i, math.nan), "p_tost_holm": adjusted_eq.get(i, math.nan),
                "verdict": verdict(c, adjusted.get(i, 1.0), adjusted_eq.get(i, 1.0), claim)
                if complete or claim is None else interim_status(row["n"], seeds)}
    return pd.DataFrame(rows, columns=["comparison", "claim", "n", "diff", "ci_low", "ci_high", "p", "p_holm",
                                       "p_tost_holm", "mcnemar_p", "verdict"])


def _mcnemar(claim: Claim, tables: dict[str, pd.DataFrame]) -> float:
    """McNemar's p over the claim's paired runs' test images; NaN for an interaction or without stored correctness."""
    trials = tables.get(claim.study)
    if claim.minus is not None or trials is None or "test_correct" not in trials:
        return math.nan
    done = _where(trials[(trials["state"] == "COMPLETE") & trials["test_correct"].notna()], claim)
    arms = [done[done[claim.column].astype(str) == v].drop_duplicates("seed").set_index("seed") for v in
            (claim.baseline, claim.other)]
    seeds = arms[0].index.intersection(arms[1].index)
    if not len(seeds):
        return math.nan
    images = int(arms[0]["test_size"].iloc[0])
    correct = [[decode_correct(arm.loc[s, "test_correct"], images) for s in seeds] for arm in arms]
    return mcnemar_test(*correct)["p"]


COUNT_COLUMNS = ("params", "macs", "flops")
"""The report's columns of whole counts (parameters, multiply-accumulates, FLOPs): shown whole, with thousands
separators; every other number to 4 places."""


POINTS_COLUMN = "diff (points)"
"""The report's column of paired differences in signed points (``+0.16``), two places."""


def _markdown(table: pd.DataFrame, missingval: str = "–") -> str:
    """``table`` as Markdown: numbers to 4 places, counts (:data:`COUNT_COLUMNS`) whole with thousands separators,
    differences in points (:data:`POINTS_COLUMN`) signed to 2 places, missing values as ``missingval``.

    Args:
        table: the rows to show.
        missingval: what a missing value (NaN, None) shows.
    """
    counts = {c: table[c].map(lambda v: v if pd.isna(v) else f"{v:,.0f}") for c in COUNT_COLUMNS if c in table}
    shown = table.assign(**counts).astype(object)
    places = ["+.2f" if column == POINTS_COLUMN else ".4f" for column in shown.columns]
    return shown.where(shown.notna(), None).to_markdown(index=False, floatfmt=places, missingval=missingval)


def _count(number: int, noun: str) -> str:
    """``number`` and ``noun``, plural unless one: ``1 trial``, ``3 trials``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _points(value: float) -> str:
    return "–" if pd.isna(value) else f"{100 * value:+.2f}"


def _in_points(family: pd.DataFrame, columns: list[str]) -> str:
    """A :func:`family_table` as Markdown, ``columns`` of it, differences and intervals in signed points."""
    shown = family.assign(**{POINTS_COLUMN: family["diff"].map(_points),
                             "95 % CI": [f"[{_points(lo)}, {_points(hi)}]" for lo, hi in
                                         zip(family["ci_low"], family["ci_high"])]})
    return _markdown(shown[columns])


def _values(trials: pd.DataFrame, column: str, form: str = "{}", separator: str = " / ") -> str:
    """The distinct values ``trials`` recorded in ``column``, each in ``form``, in order, joined by ``separator``."""
    values = sorted(trials[column].dropna().unique()) if column in trials else []
    return separator.join(form.format(value) for value in values) or "–"


def protocol_line(study: str, trials: pd.DataFrame) -> str:
    """How ``study``'s finished trials were trained, read from its table (a setting that differs between trials
    lists each value): the model (with its per-stage depths where set), the data, the length, batch and schedule,
    weight decay, precision, seeds and the machine each worker ran on.

    Args:
        study: the study's name.
        trials: its trials table.
    """
    done = trials[trials["state"] == "COMPLETE"]
    warmup, depths = _values(done, "warmup_epochs", "{:g}"), _values(done, "depths")
    model = _values(done, "model") + ("" if depths in ("none", "–") else f" with per-stage depths {depths}")
    return (f"`{study}` ran (its table's record): {model}; {_values(done, 'dataset')}, "
            f"{_values(done, 'train_size', '{:,.0f}')} training and {_values(done, 'val_size', '{:,.0f}')} validation "
            f"images; {_values(done, 'epochs', '{:.0f}')} epochs, batch {_values(done, 'batch_size', '{:.0f}')}, "
            f"{_values(done, 'recipe')} schedule with {warmup} warm-up epoch{'' if warmup == '1' else 's'}, weight "
            f"decay {_values(done, 'weight_decay', '{:g}')}, {_values(done, 'precision')}; seeds "
            f"{_values(done, 'seed', '{:.0f}', ', ')}; {_values(done, 'device')}.")


def _test_table(study: str, trials: pd.DataFrame, arm_columns: Sequence[str] = ()) -> list[str]:
    """A study's arms on the test split (mean and 95 % interval over seeds, n, size), with its trials and
    core-hours.

    Args:
        study: the study's name.
        trials: its trials table.
        arm_columns: the columns that name its arms, shown even while one arm alone has finished trials; the other
            columns that vary (a matched width, a rate) are shown too.
    """
    finished = (trials["state"] == "COMPLETE").sum()
    if not finished:
        return [f"`{study}`: no trial finished yet.", ""]
    summary = summarize(trials, by=shown_arm_columns(trials, arm_columns), metric="test_acc")
    shown = summary.drop(columns=[c for c in summary if c.startswith("latency")])
    return [f"`{study}` ({_count(finished, 'trial')}, {core_hours(trials):.1f} core-hours; test "
            "accuracy, mean and 95 % interval over seeds):", "", _markdown(shown), "", protocol_line(study, trials), ""]


def _image(study: str, plot: str, images: Path) -> str:
    """A study's plot embedded in the report (``images``: the campaign's root seen from the report's folder)."""
    return f"![{study} {Path(plot).stem}]({(images / study / plot).as_posix()})\n"


def search_section(root: Path, search: str = "search", retrain: str = "search_retrain",
                   images: Path = Path(".")) -> list[str]:
    """The report's section on the search, a finding with no paper claim and no verdict: the search's Pareto front
    in validation accuracy and FLOPs, and the front's best configurations trained again with the campaign's seeds,
    on the test split.

    Args:
        root: the campaign's results root.
        search: the search study.
        retrain: the study that trains the front's best configurations again.
        images: ``root`` seen from the report's folder, for the embedded plot.
    """
    lines = [f"## Search (`{search}`, `{retrain}`)", "",
             "**Question**: Which configurations (per-stage segments, order, activation, width) does NSGA-II find on "
             "the accuracy-FLOPs front? No paper claim: a finding, no verdict.", ""]
    trials = _table_or_none(root, search)
    if trials is None:
        return lines + ["Not run yet.", ""]
    done = trials[trials["state"] == "COMPLETE"]
    knobs: list[str] = []  # the searched columns that vary: they name a retrained configuration too
    if done.empty:
        lines += [f"`{search}`: no trial finished yet.", ""]
    else:
        searched = [c for c in ("model", "segments", "order", "mid_act", "residual", "width") if c in done]
        config = done[searched].astype(str).apply(tuple, axis=1)  # one configuration, however often it was trained
        trial = done["trial"].astype(str)  # a configuration trained more than once: each trial with its accuracy
        trial = trial.where(~config.duplicated(keep=False), trial + done["val_acc"].map(" ({:.4f})".format))
        trained = trial.groupby(config, sort=False).agg(", ".join)
        front = pareto_front(done, "val_acc", "flops").sort_values("val_acc", ascending=False)
        front = front[~config[front.index].duplicated()]  # its best trial
        front = front.assign(trial=config[front.index].map(trained))
        knobs = [c for c in searched if c in varying_columns(done)]
        lines += [f"`{search}` ({_count(len(done), 'trial')} of {_count(config.nunique(), 'configuration')}, "
                  f"{core_hours(trials):.1f} core-hours), its front (validation accuracy, one seed each; a "
                  "configuration trained more than once shows once, at its best trial, with each trial's "
                  "accuracy):", "",
                  _markdown(front[["trial", *knobs, "val_acc", "flops", "params"]]), "",
                  protocol_line(search, trials), "", _image(search, "pareto_macs.png", images)]
    again = _table_or_none(root, retrain)
    return lines + (_test_table(retrain, again, knobs) if again is not None else [f"`{retrain}`: not run yet.", ""])


class Judged(NamedTuple):
    """One ablation's tables and judgements, computed once per report for its glance rows and its section
    (:func:`judge`).

    Args:
        ablation: the ablation.
        root: the campaign's results root.
        seeds: the paired seeds per comparison the pilot fixed (:func:`registered_seeds`); ``None``: not fixed yet.
        tables: the trials tables of its studies that exist under ``root``, by study name.
        family: its family of comparisons (:func:`family_table`).
        interiors: each spectrum study's interior-optimum family (:func:`interior_family`), by study name.
        costs: each spectrum study's :func:`cost_lines`, by study name (none for a study with no table).
    """

    ablation: Ablation
    root: Path
    seeds: int | None
    tables: dict[str, pd.DataFrame]
    family: pd.DataFrame
    interiors: dict[str, pd.DataFrame]
    costs: dict[str, list[str]]


def judge(ablation: Ablation, root: Path, seeds: int | None) -> Judged:
    """Read ``ablation``'s tables under ``root`` and judge its comparisons with the pilot's ``seeds``
    (:func:`registered_seeds`; ``None``: not fixed yet)."""
    tables = {study: trials for study in ablation.studies if (trials := _table_or_none(root, study)) is not None}
    spectra = [study for study in ablation.studies if study in SPECTRUM_STUDIES]
    return Judged(ablation, root, seeds, tables, family_table(ablation, tables, seeds),
                  {study: family_table(interior_family(study), tables, seeds) for study in spectra},
                  {study: cost_lines(study, root, tables[study]) for study in spectra if study in tables})


def glance_section(judged: Sequence[Judged], pilot: Pilot) -> list[str]:
    """The report's answers first: every ablation's comparisons with their verdicts in one table, each spectrum
    study's interior-optimum outcome and the pilot's training-length checks; the sections below hold the arms, the
    details, the plots and the limitations.

    Args:
        judged: every ablation, judged (:func:`judge`).
        pilot: the pilot studies (:func:`read_pilot`), which fix the seeds and the training length.
    """
    families, interiors = [], []
    for one in judged:
        families.append(one.family.assign(study=[c.study for c in one.ablation.family]))
        for study, interior in one.interiors.items():
            interiors.append(f"- Interior optimum (`{study}`, pre-registered): "
                             f"**{interior_outcome(interior, one.seeds)}**.")
            interiors += [f"- {line}" for line in one.costs.get(study, [])[:1]]
    shown = _in_points(pd.concat(families, ignore_index=True),
                       ["study", "comparison", "claim", "n", POINTS_COLUMN, "95 % CI", "p_holm", "verdict"])
    return ["## Verdicts at a glance", "", "Each ablation's family of comparisons (Holm within it), paired by seed, "
            "test accuracy; its section below gives the arms, the tests, the plots and the limitations.", "",
            shown, "", *interiors, *length_lines(pilot), ""]


def ablation_section(judged: Judged, images: Path = Path(".")) -> list[str]:
    """The report's section on one ablation: question, arms (test accuracy, n, parameters, MACs, width), the family
    of comparisons with their verdicts, core-hours, plots and limitations.

    Args:
        judged: the ablation, judged (:func:`judge`).
        images: its results root seen from the report's folder, for the embedded plots.
    """
    ablation, root, seeds, tables, family = judged.ablation, judged.root, judged.seeds, judged.tables, judged.family
    lines = [f"## {ablation.name}", "", f"**Question**: {ablation.question}", ""]
    for study in ablation.studies:  # each arm's rate, chosen before the study runs
        lines += lr_lines(root, f"{study}{LR_STUDY_SUFFIX}", ablation.arm_columns(study))
    if not tables:
        return lines + ["Not run yet.", ""]
    for study, trials in tables.items():
        lines += _test_table(study, trials, ablation.arm_columns(study))
    shown = _in_points(family, ["comparison", "claim", "n", POINTS_COLUMN, "95 % CI", "p", "p_holm",
                                "p_tost_holm", "mcnemar_p", "verdict"])
    lines += [f"Family of {len(family)} comparisons (Holm), paired by seed, test accuracy:", "", shown, ""]
    if seeds is None:
        lines += ["**Interim**: the pilot has not fixed the seeds per arm yet; Holm-adjusted p-values and verdicts "
                  "wait for it and for every comparison's paired seeds.", ""]
    elif not family_complete(family["n"], seeds):
        lines += [f"**Interim**: {(family['n'] >= seeds).sum()} of {len(family)} comparisons have their {seeds} "
                  "paired seeds (the pilot's count); Holm-adjusted p-values and verdicts wait for all of them.", ""]
    for study, costs in judged.costs.items():  # the spectrum studies with a table
        lines += interior_lines(judged.interiors[study], seeds) + costs
    lines += [_image(study, plot, images) for study, trials in tables.items()
              if (trials["state"] == "COMPLETE").any()  # the sweep draws a study's plots once a trial finishes
              for plot in ablation.plots]
    return lines + [f"**Limitations**: {ablation.limitations}", ""]


def report_file(root: Path, out: Path | None = None) -> Path:
    """Where the report goes: ``out``, else ``root/README.md``."""
    return out or root / "README.md"


def report(root: Path, out: Path | None = None) -> str:
    """The campaign's report (Markdown) from the tables under ``root``.

    Args:
        root: the campaign's results root.
        out: the file the report is written to, which its plot links start from; ``None``: ``root/README.md``.
    """
    command = f"python -m continuum.campaign {root}" + (f" --report {out}" if out is not None else "")
    lines = ["# Campaign report", "", f"Protocol: `experiments/PROTOCOL.md`. Regenerate with `{command}`.", ""]
    images = Path(os.path.relpath(root, report_file(root, out).parent))
    pilot = read_pilot(root)
    seeds = registered_seeds(pilot)
    judged = [judge(ablation, root, seeds) for ablation in ABLATIONS]
    lines += glance_section(judged, pilot) + pilot_section(root, pilot)
    for ablation in judged:
        lines += ablation_section(ablation, images)
    lines += search_section(root, images=images)
    lines += ["## Verdict vocabulary", "", *(f"- **{word}**: {rule}." for word, rule in VERDICTS.items()),
              f"- *{INTERIM}*: {INTERIM_RULE}.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "python -m continuum.campaign") -> int:
    """``python -m continuum.campaign ROOT [--report FILE]``: write the report to ``FILE`` (default
    ``ROOT/README.md``; ``prog``: how it is called); exit 2 on a bad folder, a damaged table or a report that cannot
    be written, leaving the last report as it was."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the campaign's results root (results/campaign)")
    parser.add_argument("--report", type=Path, default=None, metavar="FILE",
                        help="the Markdown file to write (default: ROOT/README.md); its plot links start from its "
                             "folder")
    args = parser.parse_args(argv)
    out = report_file(args.root, args.report)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a folder; give the campaign's results root (results/campaign)",
              file=sys.stderr)
        return 2
    if not any(args.root.glob("*/trials.csv")):
        print(f"error: {args.root} holds no study (no {args.root}/STUDY/trials.csv); give the campaign's results "
              "root (results/campaign)", file=sys.stderr)
        return 2
    if out.is_dir() or out.suffix != ".md":
        print(f"error: --report {out} is not a Markdown file; give one such as results/README.md", file=sys.stderr)
        return 2
    try:
        text = report(args.root, args.report)
    except TableError as err:
        print(f"error: {err}; {out} is left as it was", file=sys.stderr)
        return 2
    try:
        atomic_write(out, lambda path: path.write_text(text, encoding="utf-8"))
    except OSError as err:
        print(f"error: cannot write the report to {out} ({err.strerror or err}); give a file in a writable folder",
              file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
