"""Matplotlib figures of a study: learning curves per config, the spectrum, error EDFs and Pareto fronts.

Each ``plot_*`` function returns a :class:`matplotlib.figure.Figure` built without pyplot, so importing or calling
them never switches matplotlib's backend or keeps figures open: a notebook shows a returned figure as it is, a
script saves it (``fig.savefig(...)``); :func:`write_plots` saves them all into a study's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.ticker
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from continuum.analysis import arm_columns, arm_label, edf, pareto_front, require_columns, segments_key, \
    segments_rank, summarize, varying_columns
from continuum.files import atomic_write


def _label(row: pd.Series | dict, columns: Sequence[str]) -> str:
    """:func:`~continuum.analysis.arm_label` of the row's values in ``columns``."""
    return arm_label(columns, [row[c] for c in columns])


def _groups(frame: pd.DataFrame, by: Sequence[str]) -> list[tuple[dict, pd.DataFrame]]:
    """``frame`` grouped by ``by`` as ``({column: value}, group)`` pairs, segment counts in numeric order."""
    def order(item: tuple) -> tuple:
        values = item[0] if isinstance(item[0], tuple) else (item[0],)
        return tuple(segments_key(v) if c == "segments" else str(v) for c, v in zip(by, values))

    pairs = sorted(frame.groupby(list(by), sort=False, dropna=False), key=order)
    return [(dict(zip(by, key if isinstance(key, tuple) else (key,))), group) for key, group in pairs]


LEGEND_MAX_ENTRIES = 24  # as many as fit beside the lines at these sizes; a search's dozens would cover them


def _legend(ax: Axes, fontsize: float) -> None:
    """``ax``'s legend, or, where it has more than :data:`LEGEND_MAX_ENTRIES` entries, a note of how many lines it
    would have named (a legend that long hides every line and overflows the figure)."""
    entries = len(ax.get_legend_handles_labels()[1])
    if entries <= LEGEND_MAX_ENTRIES:
        ax.legend(fontsize=fontsize)
    else:
        ax.text(0.01, 0.01, f"{entries} lines, too many to label", transform=ax.transAxes, fontsize=fontsize)


def _figure(*size: float, columns: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=size, layout="tight")
    return fig, list(fig.subplots(1, columns, squeeze=False)[0])


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically, in the format its suffix names (``.png``, ``.pdf``, ``.svg``)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".")))
    return path


def plot_curves(curves: pd.DataFrame, metric: str = "val_acc", by: str | Sequence[str] | None = None) -> Figure:
    """Mean ``metric`` per epoch for each config, with the range over seeds shaded (like the paper's figures 9-10).

    Args:
        curves: a curves table (:func:`continuum.results.load` with ``curves=True``).
        metric: the curve column to plot.
        by: the column, or columns, naming a config; default: those that vary.

    Raises:
        ValueError: a column the table lacks.
    """
    by = arm_columns(curves, by, "curves table")
    require_columns(curves, ["epoch", metric], "curves table")
    fig, (ax,) = _figure(7, 4.5)
    for values, group in _groups(curves, by):
        per_epoch = group.groupby("epoch")[metric].agg(["mean", "min", "max"])
        line, = ax.plot(per_epoch.index, per_epoch["mean"], marker="o", ms=3, label=_label(values, by))
        ax.fill_between(per_epoch.index, per_epoch["min"], per_epoch["max"], color=line.get_color(), alpha=0.15)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    _legend(ax, 7)
    return fig


def plot_spectrum(trials: pd.DataFrame) -> Figure:
    """Accuracy (mean and 95 % CI) against segments, beside MACs/parameters and latency against segments.

    Segment counts stand in numeric order (``all`` last) on every line. Lines are the values of the other varying
    config columns that vary within a segment count: a value each segment count sets (a width matched to a budget,
    a tuned learning rate) is part of that point, not a line of its own.
    """
    others = [c for c in varying_columns(trials) if c != "segments"]
    lines = [c for c in others if (trials.groupby("segments")[c].nunique(dropna=False) > 1).any()]
    table = summarize(trials, by=["segments", *lines])
    counts = sorted(table["segments"].astype(str).unique(), key=segments_key)
    position = {count: i for i, count in enumerate(counts)}  # numbers, not matplotlib's categories in drawing order
    fig, (acc_ax, cost_ax, time_ax) = _figure(14, 4.2, columns=3)
    for values, group in _groups(table, lines) if lines else [({}, table)]:
        group = group.sort_values("segments", key=segments_rank)
        x = group["segments"].astype(str).map(position)
        label = _label(values, lines)
        err = [group["val_acc_mean"] - group["val_acc_ci_low"], group["val_acc_ci_high"] - group["val_acc_mean"]]
        acc_ax.errorbar(x, group["val_acc_mean"], yerr=[e.fillna(0) for e in err], marker="o", capsize=3,
                        label=label)
        cost_ax.plot(x, group["macs"] / 1e6, marker="o", label=f"MACs (M) {label}")
        cost_ax.plot(x, group["params"] / 1e3, marker="s", ls="--", label=f"params (k) {label}")
        time_ax.plot(x, group["latency_ms"], marker="o", label=label)
    acc_ax.set(xlabel="segments", ylabel="validation accuracy", title="accuracy (mean, 95 % CI)")
    cost_ax.set(xlabel="segments", yscale="log", title="cost per image")
    time_ax.set(xlabel="segments", ylabel="ms per batch", title="measured latency")
    for ax in (acc_ax, cost_ax, time_ax):
        ax.set_xticks(range(len(counts)), counts, rotation=90 if len(counts) > 8 else 0)  # a search's per-stage counts
        ax.grid(alpha=0.3)
        _legend(ax, 6)
    return fig


def plot_edf(trials: pd.DataFrame, by: str | Sequence[str] | None = None) -> Figure:
    """Empirical distribution of validation error, one line per value of ``by`` (default: the varying columns);
    where each value has a single trial (a search), one line of every trial: the distribution over the configurations
    the study sampled.

    Raises:
        ValueError: a column the table lacks.
    """
    by = arm_columns(trials, by)
    require_columns(trials, ["state", "val_acc"], "trials table")
    done = trials[trials["state"] == "COMPLETE"]
    groups = [(_label(values, by), group) for values, group in _groups(done, by)]
    if len(groups) > 1 and all(len(group) == 1 for _, group in groups):  # one-point steps show nothing
        groups = [("every trial", done)]
    fig, (ax,) = _figure(6, 4.5)
    for label, group in groups:
        curve = edf(1 - group["val_acc"].astype(float))
        ax.step(curve["value"], curve["F"], where="post", label=f"{label} (n={len(group)})")
    ax.set(xlabel="validation error", ylabel="share of trials with lower error", title="error EDF")
    ax.grid(alpha=0.3)
    _legend(ax, 7)
    return fig


def plot_pareto(trials: pd.DataFrame, cost: str = "macs") -> Figure:
    """Every completed trial's accuracy against ``cost`` (log scale), with the Pareto front drawn."""
    done = trials[trials["state"] == "COMPLETE"]
    front = pareto_front(done, "val_acc", cost)
    fig, (ax,) = _figure(6, 4.5)
    ax.scatter(done[cost], done["val_acc"], s=14, alpha=0.6, label="trials")
    ax.plot(front[cost], front["val_acc"], color="C3", marker="o", label="Pareto front")
    for row in front.itertuples():
        ax.annotate(str(row.segments), (getattr(row, cost), row.val_acc), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.set(xscale="log", xlabel=cost, ylabel="validation accuracy", title=f"accuracy vs {cost}")
    ax.grid(alpha=0.3)
    _legend(ax, 7)
    return fig


def write_plots(trials: pd.DataFrame, curves: pd.DataFrame, folder: Path) -> list[Path]:
    """All figures of a study into ``folder``; figures with no completed trial to show are left out."""
    done = trials[trials["state"] == "COMPLETE"]
    if done.empty:
        return []
    figures = {"curves.png": plot_curves(curves[curves["trial"].isin(done["trial"])]),
               "spectrum.png": plot_spectrum(trials), "edf.png": plot_edf(trials),
               "pareto_macs.png": plot_pareto(trials, "macs"), "pareto_latency.png": plot_pareto(trials, "latency_ms")}
    return [save_figure(fig, folder / name) for name, fig in figures.items()]
