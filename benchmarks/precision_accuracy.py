"""Does bf16 autocast cost accuracy? The paired comparison of ``experiments/precision_fp32.toml`` and
``experiments/precision_bf16.toml`` (the same sweep trained in fp32 and in bf16, each pair sharing its segment count
and seed, so its initial weights, batch order and augmentation).

The rule, fixed before the runs: the per-pair differences ``d = val_acc(bf16) - val_acc(fp32)`` over every segment
count and seed are pooled; bf16 costs no accuracy we can measure when the low end of the 95 % paired t-interval of
their mean lies above ``-MARGIN`` (non-inferiority at half an accuracy point). Then ``--precision auto`` keeps
training in bf16 where the hardware computes it natively; otherwise it trains in fp32 on CPUs. The rows per segment
count (3 pairs each) describe; they do not decide. Speed: median images/s of each side's trials (each sweep ran its
two 1-thread workers side by side, alone on the machine).

    python -m continuum.sweep --config experiments/precision_fp32.toml
    python -m continuum.sweep --config experiments/precision_bf16.toml
    python benchmarks/precision_accuracy.py            # results/precision/README.md and comparison.csv

Prints the comparison and writes it next to the two studies.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from continuum.analysis import compare
from continuum.files import atomic_write
from continuum.results import load

MARGIN = 0.005
"""Non-inferiority margin: half an accuracy point."""
SIDES = ("fp32", "bf16")
KEYS = ["segments", "seed"]


def paired(root: Path) -> pd.DataFrame:
    """One row per (segments, seed) both studies completed: each side's val_acc and images/s."""
    sides = []
    for precision in SIDES:
        trials = load(root / f"precision_{precision}")
        done = trials[trials["state"] == "COMPLETE"].astype({"segments": str})
        sides.append(done.set_index(KEYS)[["val_acc", "images_per_s"]].add_suffix(f"_{precision}"))
    return sides[0].join(sides[1], how="inner").reset_index()


def comparison_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """The pooled comparison and one row per segment count: pairs, mean difference with its 95 % interval (accuracy
    points), paired p, and the speed ratio bf16 / fp32 of median images/s."""
    rows = []
    groups = [("pooled", pairs)] + [(count, group) for count, group in pairs.groupby("segments", sort=False)]
    for label, group in groups:
        result = compare(group["val_acc_fp32"], group["val_acc_bf16"], MARGIN) if len(group) >= 2 else None
        rows.append({"segments": label, "pairs": len(group),
                     "fp32_val_acc": group["val_acc_fp32"].mean(), "bf16_val_acc": group["val_acc_bf16"].mean(),
                     "diff_points": 100 * result.diff if result else float("nan"),
                     "ci_low_points": 100 * result.ci_low if result else float("nan"),
                     "ci_high_points": 100 * result.ci_high if result else float("nan"),
                     "p": result.p if result else float("nan"),
                     "speed_bf16_over_fp32": group["images_per_s_bf16"].median()
                     / group["images_per_s_fp32"].median()})
    return pd.DataFrame(rows)


def verdict(table: pd.DataFrame) -> str:
    """The rule's outcome, from the pooled row."""
    pooled = table.iloc[0]
    if pooled["pairs"] < 2:
        return "waits: fewer than 2 pairs"
    if pooled["ci_low_points"] > -100 * MARGIN:
        return (f"bf16 costs no measurable accuracy (95 % interval of the mean difference above -{100 * MARGIN:.1f} "
                "points): `--precision auto` trains in bf16 where it is native")
    return (f"a loss of more than {100 * MARGIN:.1f} points is not ruled out: `--precision auto` must train in fp32 "
            "on CPUs")


def report(root: Path, table: pd.DataFrame | None = None) -> str:
    """The Markdown report of the comparison under ``root`` (``results/precision``); ``table``: its
    :func:`comparison_table`, when already computed."""
    table = comparison_table(paired(root)) if table is None else table
    devices = sorted(set(load(root / "precision_bf16")["device"].dropna()))
    shown = table.copy()
    for column in ("fp32_val_acc", "bf16_val_acc"):
        shown[column] = shown[column].map("{:.4f}".format)
    for column in ("diff_points", "ci_low_points", "ci_high_points"):
        shown[column] = shown[column].map("{:+.2f}".format)
    shown["p"] = shown["p"].map("{:.3f}".format)
    shown["speed_bf16_over_fp32"] = shown["speed_bf16_over_fp32"].map("{:.2f}x".format)
    return "\n".join([
        "# bf16 autocast against fp32: accuracy and speed", "",
        "Commands:", "",
        "    python -m continuum.sweep --config experiments/precision_fp32.toml",
        "    python -m continuum.sweep --config experiments/precision_bf16.toml",
        "    python benchmarks/precision_accuracy.py", "",
        f"Device: {', '.join(devices)}. Validation accuracy after the last epoch on 10,000 held-out images; pairs "
        "share segment count and seed; differences bf16 - fp32 in accuracy points with 95 % paired t-intervals.",
        "", shown.to_markdown(index=False), "",
        f"Rule (fixed before the runs): pooled interval above -{100 * MARGIN:.1f} points. Verdict: {verdict(table)}.",
        ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="results/precision", help="folder of the two studies")
    args = parser.parse_args()
    root = Path(args.root)
    try:
        table = comparison_table(paired(root))
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    text = report(root, table)
    atomic_write(root / "comparison.csv", lambda path: table.to_csv(path, index=False))
    atomic_write(root / "README.md", lambda path: path.write_text(text))
    print(text)


if __name__ == "__main__":
    main()
