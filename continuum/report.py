"""Regenerate a study's ``summary.md`` and plots from its stored tables alone.

Example::

    python -m continuum.report results/default
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from continuum.analysis import summary_markdown
from continuum.files import atomic_write
from continuum.plots import write_plots
from continuum.results import TableError, load


def write_summary(folder: Path, trials=None) -> Path:
    """Write ``folder/summary.md`` from ``trials`` (default: ``folder``'s table) and ``command.txt`` if present."""
    trials = load(folder) if trials is None else trials
    commands = folder / "command.txt"
    command = commands.read_text().strip().splitlines()[0] if commands.exists() else None
    text = summary_markdown(trials, f"Study {folder.name}", command)
    atomic_write(folder / "summary.md", lambda p: p.write_text(text))
    return folder / "summary.md"


def write_report(folder: Path) -> list[Path]:
    """``summary.md``, ``trials.parquet`` (a typed copy of ``trials.csv`` for other tools) and every plot of the
    study in ``folder``, from ``trials.csv`` and ``curves.csv``."""
    trials = load(folder)
    atomic_write(folder / "trials.parquet", lambda path: trials.to_parquet(path, index=False))
    return [write_summary(folder, trials), folder / "trials.parquet",
            *write_plots(trials, load(folder, curves=True), folder)]


def main(argv: Sequence[str] | None = None, prog: str = "python -m continuum.report") -> int:
    """Run the command with ``argv`` (``prog``: how it is called); returns the exit code (2: bad tables)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a study's results folder, e.g. results/default")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.folder)
    except (FileNotFoundError, TableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write the report into {args.folder}: {err.strerror or err}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
