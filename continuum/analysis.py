"""Results tables -> summaries with confidence intervals, paired tests (t, TOST equivalence, McNemar, Holm's
correction), EDFs and Pareto fronts (pandas in, pandas out)."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttost_paired

from continuum.cost import CONTENDED_LOAD
from continuum.sweep.record import POINT_COLUMNS

SEGMENT_ORDER_ALL = 10**9
"""Sort key of ``"all"`` (after every count)."""


def segments_key(value: str) -> tuple[float, ...]:
    """Sort key of a segments cell: counts numerically, ``"all"`` last; a per-stage cell (``"4/all/16"``) stage by
    stage the same way (``"4/2/16"`` before ``"4/16/1"``)."""
    return tuple(SEGMENT_ORDER_ALL if part == "all" else float(part) if part.isdigit() else SEGMENT_ORDER_ALL + 1
                 for part in str(value).split("/"))


def segments_rank(column: pd.Series) -> pd.Series:
    """Each segments cell of ``column`` as its place in :func:`segments_key` order: a sort key that pandas (whose
    Arrow-backed sorts take no tuples) can use in ``sort_values(key=...)``."""
    text = column.astype(str)
    return text.map({value: rank for rank, value in enumerate(sorted(text.unique(), key=segments_key))})


def best_rate(scores: pd.Series) -> float:
    """The learning rate with the best score, ties to the smaller: how a point's rate is chosen from its tries.

    Args:
        scores: mean validation accuracy indexed by learning rate (missing scores are passed over).
    """
    return float(scores[scores == scores.max()].index.min())


def varying_columns(trials: pd.DataFrame, candidates: Sequence[str] = tuple(POINT_COLUMNS)) -> list[str]:
    """Config columns that take more than one value in ``trials`` (the seed excluded): what a summary groups by."""
    return [c for c in candidates if c != "seed" and c in trials and trials[c].astype(str).nunique() > 1] or \
        [c for c in ("model", "segments") if c in trials]


def arm_label(columns: Sequence[str], values: Sequence[object]) -> str:
    """An arm named by its columns' values, floats to 4 decimals as the tables print them
    (``segments=8, width=1.1111``), or ``all trials`` where no column names it.

    Args:
        columns: the columns that name an arm.
        values: its value in each.
    """
    return ", ".join(f"{column}={round(value, 4):g}" if isinstance(value, float) else f"{column}={value}"
                     for column, value in zip(columns, values)) or "all trials"


def require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str = "table") -> None:
    """Refuse a table that lacks any of ``columns``, naming them and the columns it has.

    Args:
        frame: the table.
        columns: the columns the caller reads.
        what: what the table is, for the message.

    Raises:
        ValueError: naming the missing columns.
    """
    missing = [c for c in columns if c not in frame]
    if missing:
        raise ValueError(f"the {what} has no column {', '.join(map(repr, missing))}; its columns: "
                         f"{', '.join(map(str, frame.columns))}")


def check_level(level: float) -> float:
    """A confidence level strictly between 0 and 1 (0.95 for 95 %).

    Raises:
        ValueError: naming the accepted values.
    """
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level={level!r} is not valid; use a number between 0 and 1 such as 0.95")
    return float(level)


def arm_columns(frame: pd.DataFrame, by: str | Sequence[str] | None, what: str = "trials table") -> list[str]:
    """The columns that name an arm: ``by`` (one column or several), else those that vary
    (:func:`varying_columns`), checked against the table.

    Raises:
        ValueError: a column the table lacks.
    """
    columns = [by] if isinstance(by, str) else list(by or varying_columns(frame))
    require_columns(frame, columns, what)
    return columns


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean; ``(nan, nan)`` for fewer than 2 values."""
    level = check_level(level)
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def bootstrap_interval(values: Sequence[float], statistic=np.mean, level: float = 0.95, n_resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of ``statistic``; ``(nan, nan)`` for fewer than 2 values.

    Args:
        values: the sample.
        statistic: a numpy reduction taking ``axis``.
        level: confidence level.
        n_resamples: bootstrap resamples.
        seed: seed of the resampling.
    """
    level = check_level(level)
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float("nan"), float("nan")
    result = stats.bootstrap((values,), statistic, confidence_level=level, n_resamples=n_resamples,
                             method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def measured_while_busy(trials: pd.DataFrame) -> bool:
    """Whether any of these trials measured its latency while other processes kept the machine busy (a
    ``latency_load`` above :data:`~continuum.cost.CONTENDED_LOAD`)."""
    return bool("latency_load" in trials and trials["latency_load"].gt(CONTENDED_LOAD).any())


def summarize(trials: pd.DataFrame, by: str | Sequence[str] | None = None, metric: str = "val_acc") -> pd.DataFrame:
    """One row per config over its completed trials: n seeds, mean, std and 95 % t-interval of ``metric``, and the
    config's cost (params, MACs, FLOPs, median latency).

    Args:
        trials: a trials table (:func:`continuum.results.load`).
        by: the column, or columns, that name a config; default: the config columns that vary.
        metric: the accuracy column to summarise.

    Returns:
        The table; with a ``latency_contended`` column when the trials recorded how busy the machine was.

    Raises:
        ValueError: a column named in ``by`` or ``metric`` that the table lacks.
    """
    by = arm_columns(trials, by)
    require_columns(trials, ["state", metric, "params", "macs", "flops", "latency_ms"], "trials table")
    done = trials[trials["state"] == "COMPLETE"]
    rows = []
    for key, group in done.groupby(by, sort=False, dropna=False):
        values = group[metric].astype(float).to_numpy()
        low, high = t_interval(values)
        rows.append(dict(zip(by, key if isinstance(key, tuple) else (key,))) | {
            "n": len(values), f"{metric}_mean": values.mean(), f"{metric}_std": values.std(ddof=1) if len(values) > 1
            else float("nan"), f"{metric}_ci_low": low, f"{metric}_ci_high": high,
            "params": group["params"].mean(), "macs": group["macs"].mean(), "flops": group["flops"].mean(),
            "latency_ms": group["latency_ms"].median(), "latency_contended": measured_while_busy(group)})
    columns = [*by, "n", f"{metric}_mean", f"{metric}_std", f"{metric}_ci_low", f"{metric}_ci_high", "params", "macs",
               "flops", "latency_ms"]
    if "latency_load" in done and done["latency_load"].notna().any():
        columns.append("latency_contended")
    return sort_arms(pd.DataFrame(rows, columns=columns), by)


def sort_arms(table: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """``table``'s rows (one per arm) in order of the arm columns ``by``, segment counts last and by number
    (:func:`segments_key`: 2 before 16, ``all`` last), with a fresh index.

    Args:
        table: one row per arm.
        by: the columns that name an arm.
    """
    if "segments" in table:
        table = table.sort_values([c for c in by if c != "segments"] + ["segments"], kind="stable",
                                  key=lambda col: segments_rank(col) if col.name == "segments" else col)
    return table.reset_index(drop=True)


def difference(trials: pd.DataFrame, column: str, baseline: str, other: str, metric: str = "val_acc",
               level: float = 0.95) -> dict[str, float]:
    """How much ``metric`` changes from ``column == baseline`` to ``column == other``, with a confidence interval.

    Completed trials are paired by seed where both sides have the seed (paired t-interval of the per-seed
    differences); without common seeds the interval is Welch's.

    Args:
        trials: a trials table, already filtered to the configs to compare (e.g. one segment count).
        column: the config column that differs (``order``, ``mid_act``, ``residual``, ``model``, ...).
        baseline: its value on the reference side (compared as text).
        other: its value on the other side.
        metric: the accuracy column.
        level: confidence level.

    Returns:
        ``{"diff": mean difference (other - baseline), "ci_low", "ci_high", "n": pairs or trials per side}``; NaNs
        and ``n`` 0 where a side has no completed trial yet.

    Raises:
        ValueError: a column the table lacks, or a side that no trial of the table has (a misspelt value).
    """
    level = check_level(level)
    sides = _sides(trials, column, baseline, other, metric, must_exist=True)
    common = sides[0].index.intersection(sides[1].index)
    if len(common) >= 2:
        paired = (sides[1][common] - sides[0][common]).to_numpy(dtype=float)
        low, high = t_interval(paired, level)
        return {"diff": float(paired.mean()), "ci_low": low, "ci_high": high, "n": len(common)}
    a, b = (side.to_numpy(dtype=float) for side in sides)
    if min(len(a), len(b)) < 2:  # no interval; no difference either where a side has no trial
        return {"diff": float(b.mean() - a.mean()) if len(a) and len(b) else float("nan"), "ci_low": float("nan"),
                "ci_high": float("nan"), "n": min(len(a), len(b))}
    result = stats.ttest_ind(b, a, equal_var=False).confidence_interval(level)
    return {"diff": float(b.mean() - a.mean()), "ci_low": float(result.low), "ci_high": float(result.high),
            "n": min(len(a), len(b))}


class Comparison(NamedTuple):
    """A paired comparison of two arms over seeds, in the metric's units (accuracy as a fraction).

    Args:
        diff: mean per-seed difference, other - baseline.
        ci_low: low end of its 95 % paired t-interval.
        ci_high: high end.
        n: seeds paired.
        sd: standard deviation of the per-seed differences.
        p: two-sided paired t-test p-value of "no difference".
        p_equivalent: TOST p-value of "the difference lies within ± margin" (equivalence when small).
        margin: the equivalence margin.
    """

    diff: float
    ci_low: float
    ci_high: float
    n: int
    sd: float
    p: float
    p_equivalent: float
    margin: float


def paired_sides(trials: pd.DataFrame, column: str, baseline: str, other: str, metric: str = "test_acc"
                 ) -> tuple[pd.Series, pd.Series]:
    """The completed trials' ``metric`` on each side of ``column`` (``baseline``, ``other``; compared as text), one
    value per seed (a seed's mean if it ran twice), restricted to the seeds both sides have, in seed order (empty
    while a side has no completed trial, in a study still running).

    Raises:
        ValueError: a column the table lacks.
    """
    sides = _sides(trials, column, baseline, other, metric, must_exist=False)
    common = sides[0].index.intersection(sides[1].index).sort_values()
    return sides[0][common].astype(float), sides[1][common].astype(float)


def _sides(trials: pd.DataFrame, column: str, baseline: str, other: str, metric: str, must_exist: bool
           ) -> list[pd.Series]:
    """Per side (``column == baseline``, ``column == other``, compared as text), the completed trials' ``metric``
    by seed (a seed's mean if it ran twice); with ``must_exist``, a side no trial has (in any state) is refused."""
    require_columns(trials, ["state", "seed", column, metric], "trials table")
    values = trials[column].astype(str)
    absent = [value for value in (baseline, other) if not values.eq(str(value)).any()]
    if absent and must_exist:
        raise ValueError(f"{column}={absent[0]!r} is in no trial of the table; its values: "
                         f"{', '.join(sorted(values.unique(), key=segments_key))}")
    done = trials["state"] == "COMPLETE"
    return [trials[done & values.eq(str(value))].groupby("seed")[metric].mean() for value in (baseline, other)]


def compare(baseline: Sequence[float], other: Sequence[float], margin: float = 0.01, level: float = 0.95
            ) -> Comparison:
    """Paired comparison of ``other`` with ``baseline`` (equal-length, paired by position, e.g. by seed): the mean
    difference with its t-interval, the paired t-test, and the equivalence test (two one-sided t-tests, TOST) with
    bounds ``± margin``.

    Args:
        baseline: one value per pair.
        other: one value per pair.
        margin: the equivalence margin (0.01 = 1 accuracy point).
        level: confidence level of the interval.

    Raises:
        ValueError: the sides differ in length or hold fewer than 2 pairs; a margin that is not a positive number.
    """
    level = check_level(level)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin < np.inf:
        raise ValueError(f"margin={margin!r} is not valid; use a positive number such as 0.01 (1 point)")
    a, b = np.asarray(baseline, dtype=float), np.asarray(other, dtype=float)
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired comparison needs two equal sides of at least 2 values, not {len(a)} and {len(b)}")
    d = b - a
    low, high = t_interval(d, level)
    sd = float(d.std(ddof=1))
    if sd == 0:  # identical spreads: the t statistics are undefined; decide on the mean alone
        p = 1.0 if d.mean() == 0 else 0.0
        p_equivalent = 0.0 if abs(d.mean()) < margin else 1.0
    else:
        p = float(stats.ttest_rel(b, a).pvalue)
        p_equivalent = float(ttost_paired(b, a, -margin, margin)[0])
    return Comparison(float(d.mean()), low, high, len(d), sd, p, p_equivalent, margin)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values of one family of tests (statsmodels' ``multipletests``), in the order given; a NaN
    (a test that could not run) stays NaN and still counts in the family.

    Raises:
        ValueError: a p-value outside 0..1.
    """
    if len(pvalues) == 0:
        return []
    wrong = [p for p in pvalues if not 0 <= p <= 1 and not np.isnan(p)]
    if wrong:
        raise ValueError(f"p-value {wrong[0]!r} is not valid; p-values lie in 0..1")
    return [float(p) for p in multipletests(list(pvalues), method="holm")[1]]


def mcnemar_test(baseline: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> dict[str, float]:
    """McNemar's test on per-image correctness, the pairs of runs (seeds) pooled into one table of discordant
    images.

    Args:
        baseline: per pair, a bool array of which test images the baseline run got right.
        other: the same images for the other run, paired by position.

    Returns:
        ``only_baseline`` and ``only_other`` (images only one side got right, summed over pairs) and ``p`` (exact
        binomial test when fewer than 25 discordant images, else the chi-square form with continuity correction).

    Raises:
        ValueError: unequal numbers of runs or of images in a pair, or values other than right / wrong.
    """
    if len(baseline) != len(other):
        raise ValueError(f"McNemar's test pairs runs: {len(baseline)} baseline runs and {len(other)} other runs")
    baseline, other = [_correctness(a) for a in baseline], [_correctness(b) for b in other]
    sizes = [(len(a), len(b)) for a, b in zip(baseline, other) if len(a) != len(b)]
    if sizes:
        raise ValueError(f"McNemar's test pairs images: a pair of runs scored {sizes[0][0]} and {sizes[0][1]} images")
    only_baseline = int(sum((a & ~b).sum() for a, b in zip(baseline, other)))
    only_other = int(sum((~a & b).sum() for a, b in zip(baseline, other)))
    table = [[0, only_baseline], [only_other, 0]]
    exact = only_baseline + only_other < 25
    return {"only_baseline": only_baseline, "only_other": only_other,
            "p": float(mcnemar(table, exact=exact, correction=True).pvalue)}


def _correctness(run: Sequence[bool]) -> np.ndarray:
    """One run's per-image correctness as a bool array (``True``/``False`` or 1/0)."""
    values = np.asarray(run)
    if values.dtype != bool:
        if values.size and not np.isin(values, (0, 1)).all():
            raise ValueError("per-image correctness must be True/False (or 1/0) per image")
        values = values.astype(bool)
    return values


def efficiency(summary: pd.DataFrame, metric: str = "val_acc") -> pd.DataFrame:
    """A :func:`summarize` table with accuracy per GFLOP and per millisecond of latency added.

    Args:
        summary: the per-config summary (``flops`` per image, ``latency_ms`` per batch).
        metric: the accuracy column summarised.
    """
    table = summary.copy()
    table[f"{metric}_per_gflop"] = table[f"{metric}_mean"] / (table["flops"] / 1e9)
    table[f"{metric}_per_ms"] = table[f"{metric}_mean"] / table["latency_ms"]
    return table


def edf(values: Sequence[float]) -> pd.DataFrame:
    """Empirical distribution function: sorted ``value`` and the share ``F`` of values at or below it."""
    values = np.sort(np.asarray(values, dtype=float))
    return pd.DataFrame({"value": values, "F": np.arange(1, len(values) + 1) / max(len(values), 1)})


def pareto_front(frame: pd.DataFrame, maximize: str = "val_acc", minimize: str = "macs") -> pd.DataFrame:
    """The rows no other row beats on both ``maximize`` (higher is better) and ``minimize`` (lower is better),
    sorted by ``minimize``.

    Raises:
        ValueError: a column the table lacks.
    """
    require_columns(frame, [maximize, minimize])
    ordered = frame.dropna(subset=[maximize, minimize]).sort_values([minimize, maximize], ascending=[True, False])
    keep, best = [], -np.inf
    for index, value in ordered[maximize].items():
        if value > best:
            keep.append(index)
            best = value
    return ordered.loc[keep]


def summary_markdown(trials: pd.DataFrame, title: str, command: str | None = None) -> str:
    """The Markdown summary of a study: the per-config table (with test accuracy, in a study that scored a test
    split), trial states and the command that made it."""
    table = summarize(trials)
    tested = "test_acc" in trials and trials["test_acc"].notna().any()
    if tested:
        test = summarize(trials, metric="test_acc")
        at = table.columns.get_loc("val_acc_ci_high") + 1
        for offset, column in enumerate(("test_acc_mean", "test_acc_ci_low", "test_acc_ci_high")):
            table.insert(at + offset, column, test[column].to_numpy())
    states = trials["state"].value_counts().to_dict()
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    batch = trials["latency_batch"].dropna().unique() if "latency_batch" in trials else []
    per_batch = f"median ms per inference batch of {int(batch[0])} images" if len(batch) == 1 else "median ms"
    lines += [f"Trials: {sum(states.values())} ({', '.join(f'{v} {k}' for k, v in states.items())}). "
              "Accuracy: validation accuracy after the last epoch; mean ± std over seeds, 95 % CI of the mean "
              f"(Student t){'; test: the test split, scored once after training' if tested else ''}; "
              f"MACs (multiply-adds) and FLOPs (2 per MAC) per image; latency: {per_batch}.", ""]
    shown = table.copy()
    for column in [c for c in shown if c.startswith(("val_acc_", "test_acc_"))]:
        shown[column] = shown[column].map(lambda v: f"{v:.4f}" if pd.notna(v) else "–")
    shown["params"] = shown["params"].map(lambda v: f"{v:,.0f}")
    for column in ("macs", "flops"):
        shown[column] = shown[column].map(lambda v: f"{v / 1e6:,.2f} M")
    shown["latency_ms"] = shown["latency_ms"].map(lambda v: f"{v:.2f}")
    if "latency_contended" in shown:
        shown["latency_ms"] += shown.pop("latency_contended").map(lambda busy: " *" if busy else "")
    lines.append(shown.to_markdown(index=False))
    if "latency_contended" in table and table["latency_contended"].any():
        lines += ["", f"\\* latency measured while other processes used more than {CONTENDED_LOAD * 100:.0f} % "
                  "of the machine (other workers, other jobs): contended, not to be trusted; `python -m "
                  "continuum.spectrum` measures it on a quiet machine."]
    failures = failures_by_point(trials)
    if len(failures):
        lines += ["", "Failed trials, per point, with the trial that later completed the point or runs it now:", ""]
        for row in failures.itertuples():
            outcome = (f"completed by trial {row.completed_by}" if pd.notna(row.completed_by) else
                       f"running as trial {row.running_as}" if pd.notna(row.running_as) else "not completed")
            lines.append(f"- {row.point}: {outcome}")
            lines += [f"  - trial {trial}, after {epochs} epoch{'s' * (epochs != 1)}: {reason}"
                      for trial, reason, epochs in zip(row.trials, row.reasons, row.epochs_done)]
    return "\n".join(lines) + "\n"


def failures_by_point(trials: pd.DataFrame) -> pd.DataFrame:
    """The failed trials of a study grouped by their point (the config columns that vary, the seed): which
    trials failed, why, after how many epochs, and which trial later completed the point.

    Args:
        trials: a trials table (:func:`continuum.results.load`).

    Returns:
        One row per point with a failed trial, in order of its first failure: ``point`` (its text, e.g.
        ``segments 1, lr 0.05, seed 0``), ``trials``, ``reasons``, ``epochs_done`` (lists, one entry per failed
        trial), ``completed_by`` and ``running_as`` (a trial number, or ``<NA>``).
    """
    by = [*varying_columns(trials), "seed"]
    rows = []
    for key, group in trials.sort_values("trial").groupby(by, sort=False, dropna=False):
        failed = group[group["state"] == "FAIL"]
        if failed.empty:
            continue
        done, running = group[group["state"] == "COMPLETE"], group[group["state"] == "RUNNING"]
        epochs = failed["epochs_done"] if "epochs_done" in failed else pd.Series(0, index=failed.index)
        values = key if isinstance(key, tuple) else (key,)
        rows.append({"point": ", ".join(f"{c} {v:.4g}" if isinstance(v, float) else f"{c} {v}"
                                        for c, v in zip(by, values)),
                     "trials": [int(t) for t in failed["trial"]],
                     "reasons": list(failed["fail_reason"].fillna("unknown")),
                     "epochs_done": [int(e) if pd.notna(e) else 0 for e in epochs],
                     "completed_by": int(done["trial"].iloc[0]) if len(done) else None,
                     "running_as": int(running["trial"].iloc[0]) if len(running) else None})
    columns = ["point", "trials", "reasons", "epochs_done", "completed_by", "running_as"]
    table = pd.DataFrame(sorted(rows, key=lambda row: row["trials"][0]), columns=columns)
    return table.astype({"completed_by": "Int64", "running_as": "Int64"})
