"""Bookkeeping per trial as a study grows: updating the results tables after each trial, incrementally
(:class:`~continuum.sweep.tables.StudyTables`, what a sweep does) and by rebuilding them from every trial (what it
did before), and writing ``summary.md`` from the incremental table.

Makes a synthetic study of N trials shaped like a sweep's (a grid point, the recorded columns, a curve of E epochs);
after each trial, times each way of writing the tables into a scratch folder. No training: only the bookkeeping.

    python benchmarks/table_bookkeeping.py --storage postgresql://postgres@127.0.0.1:5432/postgres
    python benchmarks/table_bookkeeping.py                    # a SQLite file in a temporary folder

Prints a table and writes results/bench/tables_<storage>.csv.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd

from continuum.config import ModelConfig, argument, integer
from continuum.files import atomic_write
from continuum.report import write_summary
from continuum.sweep.points import point_key
from continuum.sweep.record import record, study_frames
from continuum.sweep.tables import StudyTables

SEGMENTS = (1, 2, 4, 8, 16, 32, "all")


def add_trial(study: optuna.Study, number: int, epochs: int) -> None:
    """One finished trial with what a sweep records on it."""
    config = ModelConfig(segments=SEGMENTS[number % len(SEGMENTS)]).validate()
    seed = number // len(SEGMENTS)
    trial = study.ask()
    trial.set_user_attr("point", point_key(config, seed))
    trial.set_user_attr("config", config.to_dict() | {"seed": seed})
    curve = [{"epoch": e, "train_loss": 1 / e, "train_acc": 0.8, "val_loss": 0.5 / e, "val_acc": 0.8 + e / 100,
              "lr": 0.05, "seconds": 10.0, "images_per_s": 900.0} for e in range(1, epochs + 1)]
    trial.set_user_attr("curve", curve)
    record(trial, dataset="fashion-mnist", train_size=10_000, val_size=2_000, epochs=epochs, batch_size=128,
           recipe="cosine", lr=0.05, weight_decay=5e-4, latency_batch=32, device="cpu", torch=torch_version(),
           worker="bench:1", params=300_000, macs=4_000_000, flops=8_000_000, val_acc=curve[-1]["val_acc"],
           val_loss=curve[-1]["val_loss"], best_val_acc=curve[-1]["val_acc"], epochs_done=epochs, train_s=30.0,
           latency_ms=3.0, latency_load=0.0, images_per_s=900.0, wall_s=31.0)
    study.tell(trial, curve[-1]["val_acc"])


def torch_version() -> str:
    import torch
    return torch.__version__


def rebuild(study: optuna.Study, folder: Path) -> None:
    """The tables rebuilt from every trial, as a sweep wrote them before :class:`StudyTables`."""
    trials, curves = study_frames(study)
    atomic_write(folder / "trials.csv", lambda path: trials.to_csv(path, index=False))
    atomic_write(folder / "curves.csv", lambda path: curves.to_csv(path, index=False))


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", help="Optuna storage URL (default: a SQLite file in a temporary folder)")
    parser.add_argument("--trials", type=argument(integer(1)), default=500)
    parser.add_argument("--epochs", type=argument(integer(1)), default=10, help="epochs per trial's curve")
    parser.add_argument("--every", type=argument(integer(1)), default=50,
                        help="time the rebuild every N trials (it is slow)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="continuum-tables-"))
    storage = args.storage or f"sqlite:///{scratch / 'study.db'}"
    name = f"bookkeeping-{int(time.time())}"
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    (scratch / "incremental").mkdir()
    (scratch / "rebuild").mkdir()
    tables = StudyTables(study, scratch / "incremental")
    rows = []
    for number in range(args.trials):
        add_trial(study, number, args.epochs)
        row = {"trials": number + 1, "incremental_ms": timed(lambda: (tables.update(), tables.write()))}
        row["summary_ms"] = timed(lambda: write_summary(scratch / "incremental", tables.trials()))
        if (number + 1) % args.every == 0 or number == 0:
            fresh = optuna.load_study(study_name=name, storage=storage)
            row["rebuild_ms"] = timed(lambda: rebuild(fresh, scratch / "rebuild"))
        rows.append(row)
    optuna.delete_study(study_name=name, storage=storage)
    table = pd.DataFrame(rows)
    table["window"] = (table["trials"] - 1) // args.every
    shown = table.groupby("window").agg(trials=("trials", "max"), incremental_ms=("incremental_ms", "median"),
                                        summary_ms=("summary_ms", "median"), rebuild_ms=("rebuild_ms", "max"))
    print(f"storage: {storage.split('://')[0]}, {args.epochs} epochs per trial; medians over each {args.every} trials")
    print(shown.round(1).to_string(index=False))
    kind = storage.split(":")[0].split("+")[0]
    out = Path(__file__).resolve().parents[1] / "results" / "bench" / f"tables_{kind}.csv"
    atomic_write(out, lambda p: table.drop(columns="window").round(2).to_csv(p, index=False))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
