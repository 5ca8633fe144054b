"""Sweep the continuum: train every point of a grid (or a search) with Optuna, store honest results tables.

Examples:
  python -m continuum.sweep --segments 1,4,16,all                  # small net, Fashion-MNIST, ~5 min on 2 cores
  python -m continuum.sweep --segments 1,4,16,all                  # again: resumes, completed points are skipped
  python -m continuum.sweep --segments 1,8,all --order depthwise_first,pointwise_first --seeds 0,1,2
  python -m continuum.sweep --mid-act none,elu,relu --residual on,off --epochs 10 --study ablations
  python -m continuum.sweep --segments 1,2,4,8,16,32,all --match-params 300000
  python -m continuum.sweep --segments 1,4,all --match-flops 20000000          # equal FLOPs per image instead
  python -m continuum.sweep --segment-width 1,4,16,64                          # channels per segment (RegNet)
  python -m continuum.sweep --segments 1,all --kernel-size 3,5,7               # ConvNeXt's 7x7 depthwise too
  python -m continuum.sweep --segments 1,all --depths 1,2/2/2,1/3/1            # blocks per stage
  python -m continuum.sweep --segments 1,all --tracker tensorboard --save-models
  python -m continuum.sweep --search nsga2 --n-trials 40 --objectives val_acc,latency
  python -m continuum.sweep --config experiments/spectrum.toml
  python -m continuum.sweep --config a_lr.toml --config a.toml --config b.toml --workers 2   # studies in turn
  python -m continuum.sweep --dataset cifar10 --device cuda --storage postgresql://user@host/continuum

Results go to OUT/STUDY/: trials.csv (+ .parquet), curves.csv, summary.md, plots; the Optuna study lives in
OUT/STUDY/study.db unless --storage names another database. Rerunning the same command resumes the study.
Several --config files run their studies in turn on the same workers: a worker with nothing left to start in one
study takes the next one's points, and a study waits for the lr_study (or search) it reads when that is listed too.
Ctrl-C or SIGTERM stops it at once, SIGUSR1 after the epoch in progress (continuum.sweep.signals).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Collection, Sequence

import optuna
import sqlalchemy.exc

from continuum.allocator import keep_freed_memory
from continuum.config import DataConfig
from continuum.data import DataError, TensorData, load_dataset
from continuum.report import write_report, write_summary
from continuum.strategy import check_environment
from continuum.sweep.points import check_fits_memory, grid_models, grid_points, matched, unique_models
from continuum.sweep.settings import SweepConfig, add_arguments, from_settings, read_experiment
from continuum.sweep.signals import install_stop_handlers
from continuum.sweep.study import check_paths, run, storage_url
from continuum.sweep.workers import check_queue, check_worker_count, dependency, run_workers, workers_per_device
from continuum.tracking import Trackers
from continuum.train import StopRequested, resolve_device


STORAGE_FAULTS = (OSError, optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError)
"""Faults of the disk or the database during a sweep: one line and exit code 1, the study kept as it is."""


def build_parser(prog: str = "python -m continuum.sweep") -> argparse.ArgumentParser:
    """The command line: one option per setting (see :func:`~continuum.sweep.settings.add_arguments`), plus
    ``--config`` and ``--quiet``; ``prog`` is how it is called (in ``--help``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run_options = parser.add_argument_group("this run")
    run_options.add_argument("--config", type=Path, action="append",
                             help="experiment file (TOML) with these settings; several: their studies in turn, on "
                                  "the same workers (the other options apply to each)")
    run_options.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    return parser


def quiet_logs(quiet: bool) -> None:
    """Logs at INFO (WARNING when ``quiet``), Optuna's own at ERROR; and the CPU allocator kept warm."""
    keep_freed_memory()
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def prepare(cfg: SweepConfig, queued: Collection[str] = (),
            loaded: dict[DataConfig, TensorData] | None = None) -> TensorData:
    """The sweep's data, after checking that its device exists, the environment's settings are valid, the results
    and storage paths are writable and every grid point builds (nothing is written before this passes).

    Args:
        cfg: the sweep.
        queued: studies that run before this one in the same command: the ``lr_study`` (or search) it reads, when
            among them, is read once complete, not now; its models are checked now where they are known.
        loaded: the data already loaded for the studies before it, by data setting: one on the same data shares
            that copy (and is not loaded again); its own is added.

    Raises:
        ValueError, DataError: a bad device, more workers than the machine has cores, a bad environment variable,
            path or tracker, a point that does not build or does not fit in memory, a missing or unusable dataset.
    """
    device = resolve_device(cfg.train.device)
    check_worker_count(cfg.workers)
    check_environment()
    check_paths(cfg)
    Trackers(cfg.trackers)  # each can be made (installed, importable)
    loaded = {} if loaded is None else loaded
    if cfg.data not in loaded:
        loaded[cfg.data] = load_dataset(cfg.data.dataset, cfg.data.data_dir).holdout(cfg.data.holdout).subset(
            cfg.data.train_size, cfg.data.val_size)
    data = loaded[cfg.data]
    if cfg.search == "grid":
        later = dependency(cfg) in queued
        for config in grid_models(cfg) if later else unique_models(point.config for point in grid_points(cfg)):
            check_fits_memory(matched(config, cfg, data), data, device, cfg.train,
                              workers_per_device(cfg.workers, device))
    return data


def main(argv: Sequence[str] | None = None, prog: str = "python -m continuum.sweep") -> int:
    """Run ``python -m continuum.sweep`` (or ``continuum sweep``: ``prog``) with ``argv``; returns the exit code (2:
    bad input, 1: a disk or database fault, 130: interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    install_stop_handlers()
    settings = {k: v for k, v in vars(args).items() if k not in ("config", "quiet") and v is not None}
    try:
        quiet_logs(args.quiet)
        cfgs = [from_settings((read_experiment(path) if path else {}) | settings) for path in args.config or [None]]
        check_queue(cfgs)
        loaded: dict[DataConfig, TensorData] = {}  # studies on the same data share one copy
        datasets = [prepare(cfg, [c.study for c in cfgs[:i]], loaded) for i, cfg in enumerate(cfgs)]
        command = f"{prog} {shlex.join(argv)}"
        if len(cfgs) > 1 or cfgs[0].workers > 1:
            run_workers(cfgs, datasets, not args.quiet, command, write_summary, write_report)
        else:
            run(cfgs[0], datasets[0], not args.quiet, command, write_summary)
            write_report(Path(cfgs[0].out) / cfgs[0].study)
    except (ValueError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StopRequested:
        print("stopped after the epoch in progress, which is saved: rerun the same command to resume",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: the study is consistent; rerun the same command to resume", file=sys.stderr)
        return 130
    except STORAGE_FAULTS as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"error: {reason[:300]}; finished trials are kept: fix this (free disk space, permissions, the "
              "database) and rerun the same command to resume", file=sys.stderr)
        return 1
    for cfg in cfgs:
        folder = Path(cfg.out) / cfg.study
        print((folder / "summary.md").read_text())
        print(f"results: {folder}/ (trials.csv, curves.csv, summary.md, plots); study {cfg.study!r} in "
              f"{storage_url(cfg)}")
    return 0
