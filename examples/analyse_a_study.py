# %% [markdown]
# # Analyse a study
#
# A study's results folder -> one tidy DataFrame -> summaries with confidence intervals, a Pareto front and
# figures. Open this file as a notebook (VS Code, PyCharm and Jupyter with jupytext run its `# %%` cells; each
# figure is shown inline) or run it as a script, which saves the figures next to it:
#
#     python examples/analyse_a_study.py results/default

# %%
import sys
from pathlib import Path

from continuum import analysis, plots, results

arguments = [a for a in sys.argv[1:] if not a.startswith("-")]  # a notebook kernel passes -f FILE
folder = Path(arguments[0] if arguments else "results/default")

# %% [markdown]
# One row per trial (`curves=True`: per trial and epoch), plain column names.

# %%
trials = results.load(folder)
curves = results.load(folder, curves=True)
print(trials[["trial", "state", "segments", "seed", "val_acc", "params", "macs", "latency_ms"]].to_string())

# %% [markdown]
# Per config: trials, mean, standard deviation and 95 % confidence interval of the accuracy, and its cost.

# %%
summary = analysis.summarize(trials)
print(summary[["segments", "n", "val_acc_mean", "val_acc_ci_low", "val_acc_ci_high", "params", "macs"]].to_string())

# %% [markdown]
# The configs no other beats on both accuracy and multiply-accumulates.

# %%
front = analysis.pareto_front(summary, "val_acc_mean", "macs")
print(front[["segments", "val_acc_mean", "macs"]].to_string())

# %% [markdown]
# Figures: plot functions return a `matplotlib.figure.Figure` (shown when it ends a notebook cell).

# %%
spectrum = plots.plot_spectrum(trials)
learning = plots.plot_curves(curves[curves["trial"].isin(trials.loc[trials["state"] == "COMPLETE", "trial"])])
if "ipykernel" not in sys.modules:  # a script saves them beside the tables' folder, as analysis_*.png
    for name, figure in {"spectrum": spectrum, "curves": learning}.items():
        plots.save_figure(figure, folder / f"analysis_{name}.png")
        print(f"wrote {folder / f'analysis_{name}.png'}")
spectrum
