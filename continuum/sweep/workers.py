"""``--workers N``: N local worker processes (:mod:`continuum.sweep.worker`) of one sweep, sharing its study.

Each worker gets one GPU when several are visible (``CUDA_VISIBLE_DEVICES``), else an equal share of the CPU
threads. The parent watches them: a worker that dies (SIGKILL, crash) has its running trial failed at once, so a
surviving worker reruns that point; points left when every worker has gone are run by the parent itself. SIGUSR1
is passed on to the workers (each stops after its epoch in progress), and the parent then stops too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import optuna
import pandas as pd
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

from continuum.compiled import build_all
from continuum.data import TensorData
from continuum.knobs import SegmentError
from continuum.strategy import TUNER, current_mode, next_retry_s
from continuum.sweep.objective import worker_id
from continuum.sweep.points import WORKER_LOST, GridPoint, build_model, grid_points, matched, point_key
from continuum.sweep.settings import SweepConfig
from continuum.sweep.signals import stop_requested, wait_for_stop
from continuum.sweep.storage import open_storage
from continuum.sweep.study import DONE, connect, count_trials, plan_grid, run, storage_url
from continuum.train import StopRequested, resolve_device, tune_kernels

log = logging.getLogger(__name__)

QUIET_WAIT_SECONDS = 300.0
"""How long tuning before the workers start waits, in all, for a busy machine to turn quiet (the campaign's CPU
trials trained 1.1-1.5x slower on untuned convs, for hours)."""


STOPPED_EXIT_CODES = (130, -getattr(signal, "SIGUSR1", 0))
"""How a worker that SIGUSR1 stopped exits: 130 after its epoch in progress, or killed by the signal itself when it
came before the worker had set its handlers (while importing torch: no trial of its had started)."""


def visible_gpus() -> list[str]:
    """The GPUs this process may use (``$CUDA_VISIBLE_DEVICES``, else every one there is)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


def machine_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_env(index: int, workers: int) -> dict[str, str]:
    """Environment of worker ``index``: its GPU when several are visible, else its share of CPU threads."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    gpus = visible_gpus()
    if len(gpus) > 1:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    else:
        env |= thread_env(workers)
    return env


def thread_env(workers: int) -> dict[str, str]:
    """The environment variables that hold each of ``workers`` processes to its share of the CPU threads."""
    threads = str(worker_threads(workers))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def worker_threads(workers: int) -> int:
    """CPU threads of each of ``workers`` local workers: an equal share of the cores."""
    return max(1, machine_cores() // workers)


def workers_per_device(workers: int, device: torch.device) -> int:
    """How many of ``workers`` local workers train at once on one device: all of them on the CPU or a single GPU,
    their share where each of several GPUs takes its turn."""
    gpus = len(visible_gpus()) if device.type == "cuda" else 1
    return -(-workers // max(gpus, 1))


def check_worker_count(workers: int) -> None:
    """Refuse more local workers than this machine has cores: each trains with at least one core (and feeds its
    GPU from one), and a typo such as ``--workers 1000`` would start processes until memory runs out.

    Raises:
        ValueError: naming the cores there are and how to run more workers.
    """
    cores = machine_cores()
    if workers > cores:
        raise ValueError(f"workers={workers} is more than the {cores} CPU cores here; use --workers {cores} or fewer "
                         "(start workers on other machines against the same --storage to run more)")


def tune_for_workers(cfg: SweepConfig, data: TensorData, points: Sequence[GridPoint], progress: bool = True) -> None:
    """Tune the conv kernels of every model ``points`` train, here, before the workers start, with a worker's
    thread count. Once they run, each keeps the others' cores busy, so the tuner (rightly) times nothing in them
    and they would train on the plain grouped conv throughout; the choices made here on the quiet machine go to the
    disk cache, which they read. Where another job keeps the machine busy, it tunes again when the tuner asks,
    waiting up to :data:`QUIET_WAIT_SECONDS` in all. Only on the CPU (a worker per GPU finds its GPU quiet) and with
    autotuning on; a model that cannot be built is left to its trial to fail.

    Args:
        cfg: the sweep (its ``workers`` and training settings).
        data: the dataset the trials train on.
        points: the grid points still to run (their models tuned at the widths their trials train: matched to
            ``--match-params`` or ``--match-flops`` where set).
        progress: show a bar over the models (a model's first tuning on a machine takes about a minute).
    """
    if resolve_device(cfg.train.device).type != "cpu" or current_mode() != "auto":
        return
    unmatched = {json.dumps(point.config.to_dict(), sort_keys=True, default=list): point.config for point in points}
    configs = {}  # each model once (a point's rates and seeds share it), as its trials train it: width-matched
    for config in unmatched.values():
        try:
            config = matched(config, cfg, data)
        except (ValueError, SegmentError):
            continue  # left to its trial to fail
        configs[json.dumps(config.to_dict(), sort_keys=True, default=list)] = config
    if not configs:
        return
    log.warning("tuning the conv kernels of %d model(s) before the workers start (the first time on a machine: about "
                "a minute each; then cached)", len(configs))
    build_all()  # side by side, rather than one by one as the first model's convs ask for them
    threads = torch.get_num_threads()
    torch.set_num_threads(worker_threads(cfg.workers))
    deadline, untuned = time.monotonic() + QUIET_WAIT_SECONDS, False  # for the waits and the tunings between them
    try:
        for config in tqdm(configs.values(), desc="tuning conv kernels", unit="model", disable=not progress):
            try:
                model = build_model(config, data)
            except (ValueError, SegmentError):
                continue
            with TUNER.recording() as met:  # the calls of this model at a worker's threads: those to wait for
                tune_kernels(model, data, cfg.train)
                while (wait := next_retry_s(met)) is not None and time.monotonic() + wait <= deadline:
                    time.sleep(wait)  # another job kept the machine busy: wait for it, as the tuner asks
                    tune_kernels(model, data, cfg.train)
                untuned = untuned or next_retry_s(met) is not None
    finally:
        torch.set_num_threads(threads)
    if untuned:
        log.warning("the machine stayed busy: some conv kernels were not tuned within %.0f s, and the workers run "
                    "the plain grouped conv there (stop the other job and restart the sweep to tune them)",
                    QUIET_WAIT_SECONDS)


def fail_trials_of(study: optuna.Study, storage: optuna.storages.BaseStorage, pid: int, reason: str) -> int:
    """Fail the RUNNING trials of worker process ``pid`` on this host; returns how many."""
    worker = worker_id(pid)
    study_id = storage.get_study_id_from_name(study.study_name)
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("worker") == worker:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
            failed += 1
    return failed


def run_workers(cfg: SweepConfig, data: TensorData, progress: bool = True, command: str | None = None,
                after_export: Callable[[Path, pd.DataFrame], object] | None = None) -> optuna.Study:
    """Run the sweep with ``cfg.workers`` local processes, then finish in this one.

    Args:
        cfg: the validated sweep (its ``workers`` > 1).
        data: the dataset, for finishing leftover points here.
        progress: show one bar for the whole sweep.
        command: the command line, recorded beside the tables.
        after_export: called with the results folder after every export (see :func:`~continuum.sweep.study.run`).
    """
    url = storage_url(cfg)
    study = connect(cfg, worker=0)
    storage = open_storage(url, cfg.heartbeat)
    points = list(grid_points(cfg)) if cfg.search == "grid" else []
    keys = [point_key(point) for point in points]
    if keys:
        plan_grid(study, keys, cfg.retry_failed)  # once here, so workers seldom race to queue the same points
        done = {trial.user_attrs.get("point") for trial in study.get_trials(deepcopy=False, states=DONE)}
        tune_for_workers(cfg, data, [point for point, key in zip(points, keys) if key not in done], progress)
    log.warning("%d workers on %s", cfg.workers, url)
    worker_cfg = dataclasses.replace(cfg, workers=1, storage=url).to_json()
    processes = [subprocess.Popen([sys.executable, "-m", "continuum.sweep.worker", worker_cfg, str(i + 1)],
                                  env=worker_env(i, cfg.workers)) for i in range(cfg.workers)]
    total = len(keys) if keys else cfg.n_trials
    bar = tqdm(total=total, desc=f"sweep {cfg.study} ({cfg.workers} workers)", unit="trial", disable=not progress)
    handled: set[int] = set()
    passed_on = False
    try:
        while len(handled) < len(processes):
            if passed_on:
                time.sleep(1)
            elif wait_for_stop(1):  # passed on at once: each worker stops after its epoch in progress
                for process in processes:
                    if process.poll() is None:
                        process.send_signal(signal.SIGUSR1)
                passed_on = True
            for process in processes:
                if process.pid in handled or process.poll() is None:
                    continue
                handled.add(process.pid)
                if process.returncode != 0 and not (passed_on and process.returncode in STOPPED_EXIT_CODES):
                    lost = fail_trials_of(study, storage, process.pid,
                                          f"{WORKER_LOST}: worker {process.pid} exited with code "
                                          f"{process.returncode}")
                    log.warning("worker %d exited with code %d; %d running trial(s) failed and requeued",
                                process.pid, process.returncode, lost)
            done = count_trials(study, DONE, set(keys) if keys else None)
            bar.n = min(done, total)
            bar.refresh()
    except KeyboardInterrupt:
        for process in processes:  # SIGTERM: a worker started from a background shell inherits SIGINT ignored
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait()
        raise
    finally:
        bar.close()
    if stop_requested():
        raise StopRequested("the workers stopped after their epochs in progress")
    return run(dataclasses.replace(cfg, workers=1, storage=url), data, progress, command, after_export, worker=0)
