"""continuum's command line: sweep, report, spectrum, bench, arm_latency and campaign (each also runs as
python -m continuum.NAME).

Examples:
  continuum sweep --segments 1,4,16,all            # = python -m continuum.sweep --segments 1,4,16,all
  continuum report results/default                 # summary.md, trials.parquet and plots from the tables
  continuum spectrum --segments 1,4,16,all         # params, MACs and latency along the continuum, no training
  continuum bench --shapes small_64                # the conv kernels against torch's and timm's
  continuum arm_latency results/campaign/spectrum_params   # each arm's inference latency, on a quiet machine
  continuum campaign results/campaign --report results/README.md   # the campaign's report from its tables
  continuum sweep --help                           # each command's own options
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

COMMANDS = {
    "sweep": ("continuum.sweep.cli", "train the points of a grid or a search with Optuna; store the results tables"),
    "report": ("continuum.report", "regenerate a study's summary.md, trials.parquet and plots from its tables"),
    "spectrum": ("continuum.spectrum", "parameters, MACs and measured latency along the continuum, no training"),
    "bench": ("continuum.bench", "time the segmented-conv kernels against torch's and timm's (CSV tables)"),
    "arm_latency": ("continuum.arm_latency", "each arm of a finished study: inference latency on a quiet machine"),
    "campaign": ("continuum.campaign", "the campaign's report (verdicts, intervals, plots) from its studies' tables"),
}
"""Each subcommand: the module whose ``main(argv, prog)`` runs it, and one line for ``continuum --help``."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``continuum COMMAND ARGS...``; returns the command's exit code (2 for an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="continuum", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # --help, or a one-line error naming the commands (exit code 2)
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:], prog=f"continuum {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
