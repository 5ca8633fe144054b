"""Notebook use: importing continuum leaves matplotlib's backend alone, plots return figures, and the example
analysis runs on a committed study's tables."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from continuum import plots, results

ROOT = Path(__file__).resolve().parents[1]


def test_importing_continuum_never_switches_the_backend():
    code = ("import matplotlib; import continuum, continuum.plots, continuum.report, continuum.sweep.cli, "
            "continuum.spectrum, continuum.bench; print(matplotlib.get_backend())")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=os.environ | {"MPLBACKEND": "svg"}).stdout.split()[-1]
    assert shown == "svg"


def test_plot_functions_return_figures_that_write_plots_saves(tmp_path):
    trials, curves = results.load(ROOT / "results/default"), results.load(ROOT / "results/default", curves=True)
    figures = [plots.plot_spectrum(trials), plots.plot_curves(curves), plots.plot_edf(trials),
               plots.plot_pareto(trials, "latency_ms")]
    assert all(isinstance(fig, Figure) for fig in figures)
    assert len(figures[0].axes) == 3 and figures[0].axes[0].get_xlabel() == "segments"
    path = plots.save_figure(figures[2], tmp_path / "edf.svg")
    assert path.read_text().lstrip().startswith("<?xml")


def test_the_example_analysis_runs_on_a_studys_tables(tmp_path):
    folder = shutil.copytree(ROOT / "results/default", tmp_path / "default")
    run = subprocess.run([sys.executable, str(ROOT / "examples/analyse_a_study.py"), str(folder)],
                         capture_output=True, text=True, env=os.environ | {"MPLBACKEND": "svg"})
    assert run.returncode == 0, run.stderr
    trials = pd.read_csv(folder / "trials.csv")
    for segments in trials["segments"].astype(str):
        assert f" {segments} " in run.stdout
    assert "val_acc_ci_low" in run.stdout
    assert (folder / "analysis_spectrum.png").stat().st_size > 1000


def test_the_spectrum_keeps_segments_in_numeric_order_with_matched_widths_on_one_line(caplog):
    """A matched width and a tuned rate differ per segment count: one line over 1, 2, 16, all in that order (not
    one dot per width, nor matplotlib's categories in drawing order), and no note from matplotlib's category axis."""
    arms = [("16", 1.11, 0.1, 0.93), ("all", 1.5, 0.2, 0.94), ("1", 0.55, 0.05, 0.92), ("2", 0.67, 0.05, 0.925)]
    rows = [{"state": "COMPLETE", "model": "continuum_small", "segments": count, "width": width, "lr": lr,
             "seed": seed, "val_acc": acc + seed / 1000, "params": 1000, "macs": 5e6, "flops": 1e7, "latency_ms": 1.0}
            for count, width, lr, acc in arms for seed in (0, 1)]
    with caplog.at_level("INFO"):
        fig = plots.plot_spectrum(pd.DataFrame(rows))
    accuracy = fig.axes[0]
    (line,) = [container.lines[0] for container in accuracy.containers]  # one errorbar line
    assert list(line.get_xdata()) == [0, 1, 2, 3]
    assert [round(y, 4) for y in line.get_ydata()] == [0.9205, 0.9255, 0.9305, 0.9405]
    assert [t.get_text() for t in accuracy.get_xticklabels()] == ["1", "2", "16", "all"]
    assert "categorical units" not in caplog.text


def test_a_plot_with_more_lines_than_a_legend_can_name_says_how_many_instead():
    """A search's dozens of configurations: no legend covering the lines, a note of their number; a few keep one."""
    def trials(configs: int) -> pd.DataFrame:
        return pd.DataFrame([{"trial": i, "state": "COMPLETE", "model": "continuum_small", "segments": "4",
                              "width": 0.5 + i / 100, "seed": 0, "val_acc": 0.9, "params": 1000, "macs": 5e6,
                              "flops": 1e7, "latency_ms": 1.0} for i in range(configs)])

    many = plots.LEGEND_MAX_ENTRIES + 1
    for fig in (plots.plot_curves(trials(many).assign(epoch=1)), plots.plot_spectrum(trials(many))):
        assert all(ax.get_legend() is None for ax in fig.axes)
        assert f"{many} lines, too many to label" in [t.get_text() for t in fig.axes[0].texts]
    few = plots.plot_curves(trials(3).assign(epoch=1)).axes[0]
    assert len(few.get_legend().get_texts()) == 3 and not few.texts


def test_the_edf_of_a_study_with_one_trial_per_configuration_is_one_line_of_every_trial():
    """A search trains each configuration once: one-point EDFs per configuration draw nothing, so one line of all."""
    rows = [{"state": "COMPLETE", "segments": s, "width": w, "seed": seed, "val_acc": acc}
            for s, w, seed, acc in [("1", 1.0, 0, 0.90), ("4", 0.5, 0, 0.92), ("all", 1.5, 0, 0.91)]]
    (ax,) = plots.plot_edf(pd.DataFrame(rows)).axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["every trial (n=3)"]
    rows += [dict(row, seed=1, val_acc=row["val_acc"] + 0.01) for row in rows]  # seeds: one line per configuration
    (ax,) = plots.plot_edf(pd.DataFrame(rows)).axes
    assert len(ax.get_legend().get_texts()) == 3
