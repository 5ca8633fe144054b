"""Quiet-machine latency of every arm of a finished study: rebuild each configuration its trials trained (from
``trials.csv``) and time its inference alone, into ``latency.csv`` beside the tables.

A trial's own ``latency_ms`` is taken right after its training, often beside other workers (marked contended); this
one is taken on an idle machine, and refused when other processes are busy, so arms compare by their cost alone.

Example::

    python -m continuum.arm_latency results/campaign/spectrum_params --batch-size 32
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from continuum.cost import CONTENDED_LOAD, measure_latency
from continuum.data import DataError, load_dataset
from continuum.files import atomic_write
from continuum.results import TableError, load
from continuum.sweep.points import build_model, table_config
from continuum.sweep.record import POINT_COLUMNS
from continuum.timing import device_name
from continuum.train import resolve_device

LATENCY_FILE = "latency.csv"
"""Where a study's quiet latencies go, beside its ``trials.csv``."""

ARM_COLUMNS = [c for c in POINT_COLUMNS if c not in ("lr", "seed")]
"""What tells one arm (one architecture) from another: the point columns but the learning rate and the seed."""

LATENCY_COLUMNS = [*ARM_COLUMNS, "params", "latency_ms", "latency_q1_ms", "latency_q3_ms", "latency_load",
                   "batch_size", "device", "measured"]
"""The columns of ``latency.csv``."""


class BusyMachine(RuntimeError):
    """Other processes used the machine while an arm was timed: its latency would not be its own."""


def arm_latencies(trials: pd.DataFrame, batch_size: int = 32, repeats: int = 20, device: str = "cpu",
                  data_dir: str | None = None) -> pd.DataFrame:
    """Time each arm of a study's finished trials alone.

    Args:
        trials: the study's trials table (:func:`continuum.results.load`).
        batch_size: images per timed inference call.
        repeats: timed calls per arm (the median is kept, with the quartiles).
        device: where to time.
        data_dir: where the study's dataset is (its shape and classes size the models).

    Returns:
        One row per arm, :data:`LATENCY_COLUMNS`.

    Raises:
        ValueError: no finished trial, or an arm that does not rebuild to the parameters it trained with.
        BusyMachine: other processes used more than :data:`~continuum.cost.CONTENDED_LOAD` of the machine.
    """
    done = trials[trials["state"] == "COMPLETE"]
    if done.empty:
        raise ValueError("the study has no finished trial to time")
    data = load_dataset(str(done["dataset"].iloc[0]), data_dir)
    arms = done.astype({c: str for c in ARM_COLUMNS}).drop_duplicates(ARM_COLUMNS)
    rows = []
    for _, arm in arms.iterrows():
        torch.manual_seed(0)
        model = build_model(table_config(arm), data)
        params = sum(p.numel() for p in model.parameters())
        if params != int(arm["params"]):
            raise ValueError(f"trial {arm['trial']}'s configuration rebuilds with {params:,} parameters, not the "
                             f"{int(arm['params']):,} it trained with; time it with the code that trained it")
        latency = measure_latency(model, data.input_size, batch_size, device, warmup=3, repeats=repeats)
        if latency.contended:
            raise BusyMachine(f"other processes used {latency.other_load:.0%} of the machine while "
                              f"segments={arm['segments']} was timed (at most {CONTENDED_LOAD:.0%}); stop them "
                              "and rerun on a quiet machine")
        rows.append({**arm[ARM_COLUMNS].to_dict(), "params": params, "latency_ms": latency.median_ms,
                     "latency_q1_ms": latency.q1_ms, "latency_q3_ms": latency.q3_ms,
                     "latency_load": latency.other_load, "batch_size": batch_size,
                     "device": device_name(torch.device(device)), "measured": datetime.now().isoformat(" ", "seconds")})
    return pd.DataFrame(rows, columns=LATENCY_COLUMNS)


def main(argv: Sequence[str] | None = None, prog: str = "python -m continuum.arm_latency") -> int:
    """``python -m continuum.arm_latency FOLDER``: write ``FOLDER/latency.csv`` (``prog``: how it is called); exit 2 on
    a bad folder or table, 1 on a busy machine (nothing written)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a finished study's results folder")
    parser.add_argument("--batch-size", type=int, default=32, help="images per timed call (default: 32)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per arm (default: 20)")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N (default: cpu)")
    parser.add_argument("--data-dir", help="where the study's dataset is (default: the usual places)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        print("error: --batch-size and --repeats must be whole numbers >= 1", file=sys.stderr)
        return 2
    try:
        device = str(resolve_device(args.device))
        table = arm_latencies(load(args.folder), args.batch_size, args.repeats, device, args.data_dir)
    except (FileNotFoundError, TableError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BusyMachine as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    path = args.folder / LATENCY_FILE
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
    print(table[["segments", "width", "params", "latency_ms", "latency_load"]].to_markdown(index=False))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
