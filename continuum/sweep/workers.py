"""``--workers N``: N local worker processes (:mod:`continuum.sweep.worker`) sharing one study, or several studies
taken in turn (``--config A.toml --config B.toml``).

Each worker gets one GPU when several are visible (``CUDA_VISIBLE_DEVICES``), else an equal share of the CPU
threads. A worker leaves once its study has no trial free to start; its place then goes to the first study, in the
order given, that has one (so no core idles while another worker runs a study's last trial), the study it left
included when points come free there again (a learning rate beyond the grid's edge, a dead worker's point). A study
whose ``lr_study`` or ``retrain`` is among them waits until that study is complete. The parent watches the
workers: a worker that dies (SIGKILL, crash) has its running trial failed at once, so another worker reruns that
point; a study that loses :data:`LOST_WORKERS_LIMIT` workers gets no more, and the parent runs what is left of it
itself at the end. SIGUSR1 is passed on to the workers (each stops after its epoch in progress), and the parent
then stops too.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Collection, Sequence

import optuna
import pandas as pd
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

from continuum.compiled import build_all
from continuum.config import ModelConfig
from continuum.data import TensorData
from continuum.knobs import SegmentError
from continuum.strategy import TUNER, current_mode, next_retry_s
from continuum.sweep.objective import worker_id
from continuum.sweep.points import (WORKER_LOST, build_model, grid_models, grid_points, matched, point_key,
                                   unique_models)
from continuum.sweep.settings import SweepConfig
from continuum.sweep.signals import stop_requested, wait_for_stop
from continuum.sweep.storage import open_storage, storage_file
from continuum.sweep.study import DONE, connect, count_trials, has_work, plan, run, storage_url
from continuum.train import StopRequested, resolve_device, tune_kernels

log = logging.getLogger(__name__)

QUIET_WAIT_SECONDS = 300.0
"""How long tuning before the workers start waits, in all, for a busy machine to turn quiet (the campaign's CPU
trials trained 1.1-1.5x slower on untuned convs, for hours)."""


LOST_WORKERS_LIMIT = 3
"""Workers a study may lose (killed, crashed) before it gets no more: its leftover points then run in the parent,
where the cause shows, rather than in a loop of workers that die."""

BAD_INPUT_EXIT_CODE = 2
"""How a worker exits that refuses its study (a point that does not build or fit, an unreadable ``lr_study``)."""

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


def tune_for_workers(cfg: SweepConfig, data: TensorData, configs: Sequence[ModelConfig], progress: bool = True,
                     deadline: float | None = None) -> None:
    """Tune the conv kernels of the models ``configs``, here, before the workers start, with a worker's
    thread count. Once they run, each keeps the others' cores busy, so the tuner (rightly) times nothing in them
    and they would train on the plain grouped conv throughout; the choices made here on the quiet machine go to the
    disk cache, which they read. Where another job keeps the machine busy, it tunes again when the tuner asks,
    waiting up to :data:`QUIET_WAIT_SECONDS` in all. Only on the CPU (a worker per GPU finds its GPU quiet) and with
    autotuning on; a model that cannot be built is left to its trial to fail.

    Args:
        cfg: the sweep (its ``workers`` and training settings).
        data: the dataset the trials train on.
        configs: the models of the grid points still to run (tuned at the widths their trials train: matched to
            ``--match-params`` or ``--match-flops`` where set).
        progress: show a bar over the models (a model's first tuning on a machine takes about a minute).
        deadline: the :func:`time.monotonic` time up to which it waits for a busy machine (default:
            :data:`QUIET_WAIT_SECONDS` from now).
    """
    if resolve_device(cfg.train.device).type != "cpu" or current_mode() != "auto":
        return
    models = []  # each model once (a point's rates and seeds share it), as its trials train it: width-matched
    for config in unique_models(configs):
        try:
            models.append(matched(config, cfg, data))
        except (ValueError, SegmentError):
            continue  # left to its trial to fail
    if not models:
        return
    log.warning("tuning the conv kernels of %d model(s) of %s before the workers start (the first time on a machine: "
                "about a minute each; then cached)", len(models), cfg.study)
    build_all()  # side by side, rather than one by one as the first model's convs ask for them
    threads = torch.get_num_threads()
    torch.set_num_threads(worker_threads(cfg.workers))
    deadline = time.monotonic() + QUIET_WAIT_SECONDS if deadline is None else deadline  # for waits and tunings
    untuned = False
    try:
        for config in tqdm(models, desc="tuning conv kernels", unit="model", disable=not progress):
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


def dependency(cfg: SweepConfig) -> str | None:
    """The study ``cfg`` reads before it can run: its ``lr_study``, or the search it trains again (``retrain``)."""
    return cfg.lr_study or cfg.retrain


def check_queue(cfgs: Sequence[SweepConfig]) -> None:
    """Refuse studies that cannot take turns on one set of workers: a study listed twice, different worker counts,
    or a study listed before the ``lr_study`` or search it reads.

    Raises:
        ValueError: naming the study and the fix.
    """
    names = [cfg.study for cfg in cfgs]
    for i, cfg in enumerate(cfgs):
        if cfg.study in names[:i]:
            raise ValueError(f"study {cfg.study!r} is listed twice; give each study once (one --config each)")
        if dependency(cfg) in names[i + 1:]:
            raise ValueError(f"study {cfg.study!r} reads study {dependency(cfg)!r}, which is listed after it; give "
                             f"{dependency(cfg)}'s --config first")
    if len({cfg.workers for cfg in cfgs}) > 1:
        asked = ", ".join(f"{cfg.study}: {cfg.workers}" for cfg in cfgs)
        raise ValueError(f"the studies ask for different numbers of workers ({asked}); give --workers N for all")


@dataclasses.dataclass(eq=False)
class QueuedStudy:
    """One study of :func:`run_workers`, and what the parent knows of it.

    Args:
        cfg: the study's sweep.
        data: its dataset (for tuning, and for the points the parent runs itself).
    """

    cfg: SweepConfig
    data: TensorData
    study: optuna.Study | None = None
    """The study, opened when a worker may take it (what it reads, :func:`dependency`, is complete)."""
    grid: list[str] = dataclasses.field(default_factory=list)
    """Its grid points' keys (:func:`~continuum.sweep.points.point_key`)."""
    started: int = 0
    """Workers started on it (each numbered by this count: a search's workers draw apart)."""
    lost: int = 0
    """Of which died."""
    finished: bool = False
    error: str | None = None
    """Why it cannot run (it then gets no workers)."""

    def worker_command(self) -> list[str]:
        """The command of its next worker process (:mod:`continuum.sweep.worker`), on the parent's storage."""
        cfg = dataclasses.replace(self.cfg, workers=1, storage=storage_url(self.cfg))
        return [sys.executable, "-m", "continuum.sweep.worker", cfg.to_json(), str(self.started)]

    def free_trials(self) -> int:
        """Trials a worker started now could run: the grid's queued points (after queueing the missing ones and
        those ``lr_extend`` adds), or a search's trials short of ``n_trials`` that none runs (at least its points
        queued again)."""
        try:
            if not has_work(self.study, self.cfg, self.grid, wait=False):
                return 0
        except StopRequested:
            return 0  # passed on to the workers by the next pass
        if self.cfg.search == "grid":
            return count_trials(self.study, (TrialState.WAITING,))
        return max(self.cfg.n_trials - count_trials(self.study, (*DONE, TrialState.RUNNING)),
                   count_trials(self.study, (TrialState.WAITING,)))

    def starting(self, running: Collection[tuple[subprocess.Popen, QueuedStudy]]) -> int:
        """Its workers among ``running`` that run no trial yet (about to take one of the free trials)."""
        taking = {trial.user_attrs.get("worker")
                  for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        return sum(1 for process, queued in running if queued is self and worker_id(process.pid) not in taking)

    def running_trials(self) -> int:
        """Its trials running anywhere (here, or on other machines sharing its storage)."""
        return count_trials(self.study, (TrialState.RUNNING,), set(self.grid) if self.grid else None)

    def done_trials(self) -> int:
        """Its finished trials (of the grid's points)."""
        return count_trials(self.study, DONE, set(self.grid) if self.grid else None)

    def total_trials(self) -> int:
        """Its grid's points, or its search's ``n_trials``."""
        return len(self.grid) if self.cfg.search == "grid" else self.cfg.n_trials

    def models_to_run(self) -> list[ModelConfig]:
        """The models of the grid points it has still to run (all of them while what it reads is not complete:
        they do not depend on the learning rates it will read); none for a search or a ``retrain``."""
        if self.cfg.search != "grid" or self.error is not None:
            return []
        if self.study is None:
            return grid_models(self.cfg)
        done = {trial.user_attrs.get("point") for trial in self.study.get_trials(deepcopy=False, states=DONE)}
        return [point.config for point in grid_points(self.cfg) if point_key(point) not in done]


class StudyQueue:
    """Studies taking turns on ``workers`` local worker processes (see the module's docstring).

    Args:
        cfgs: the validated sweeps (:func:`check_queue`), in the order their studies take free workers.
        datasets: each sweep's dataset.
        command: the command line, recorded beside each study's tables.
        after_export: called with the results folder after every export (see :func:`~continuum.sweep.study.run`).
        after_study: called with a study's results folder once it is complete (its report).
    """

    def __init__(self, cfgs: Sequence[SweepConfig], datasets: Sequence[TensorData], command: str | None = None,
                 after_export: Callable[[Path, pd.DataFrame], object] | None = None,
                 after_study: Callable[[Path], object] | None = None):
        self.studies = [QueuedStudy(cfg, data) for cfg, data in zip(cfgs, datasets)]
        self.by_name = {queued.cfg.study: queued for queued in self.studies}
        self.workers = cfgs[0].workers
        self.command, self.after_export, self.after_study = command, after_export, after_study
        for queued in self.studies:  # a study run before with other settings stops the command before any worker
            file = storage_file(storage_url(queued.cfg))  # starts (a new study's folder is made when it starts)
            stored = file is None or file.exists() or (Path(queued.cfg.out) / queued.cfg.study).exists()
            if self.ready(queued) and stored:
                self.open(queued)

    def ready(self, queued: QueuedStudy) -> bool:
        """Whether what ``queued`` reads is complete (or was complete before: not among these studies)."""
        needed = self.by_name.get(dependency(queued.cfg))
        return needed is None or needed.finished

    def open(self, queued: QueuedStudy) -> None:
        """Open the study of ``queued`` and list its grid (reading its ``lr_study`` or search) and queue its points
        (a search's interrupted ones).

        Raises:
            ValueError: the study holds other settings, or what it reads cannot be read.
        """
        queued.grid = [point_key(point) for point in grid_points(queued.cfg)] if queued.cfg.search == "grid" else []
        queued.study = connect(queued.cfg, worker=0)
        plan(queued.study, queued.cfg, queued.grid)  # here, so workers seldom race for it

    def opened(self, queued: QueuedStudy) -> bool:
        """Whether ``queued`` is open and can run, opening it once it is ready; a study that cannot be opened then
        gets an ``error`` (the others go on)."""
        if queued.study is None and queued.error is None and self.ready(queued):
            try:
                self.open(queued)
            except ValueError as err:
                queued.error = f"study {queued.cfg.study}: {err}"
                log.error("%s; the other studies go on", queued.error)
        return queued.study is not None and queued.error is None

    def tune(self, progress: bool) -> None:
        """Tune the conv kernels of every model the studies have still to train (:func:`tune_for_workers`), before
        any worker starts, waiting for a busy machine :data:`QUIET_WAIT_SECONDS` in all."""
        deadline = time.monotonic() + QUIET_WAIT_SECONDS
        for queued in self.studies:
            tune_for_workers(queued.cfg, queued.data, queued.models_to_run(), progress, deadline)

    def next_study(self, running: Collection[tuple[subprocess.Popen, QueuedStudy]]) -> QueuedStudy | None:
        """The first study, in order, with a trial free for one more worker than ``running`` starts on it (opening
        the studies it looks at)."""
        for queued in self.studies:
            if (not queued.finished and queued.lost < LOST_WORKERS_LIMIT and self.opened(queued)
                    and queued.free_trials() > queued.starting(running)):
                return queued
        return None

    def finish_complete(self, running: Collection[tuple[subprocess.Popen, QueuedStudy]], progress: bool) -> None:
        """Finish (:meth:`finish`) each open study that no worker of ``running`` runs, with no trial free or
        running."""
        for queued in self.studies:
            if (not queued.finished and queued.study is not None and queued.error is None
                    and all(other is not queued for _, other in running)
                    and not queued.free_trials() and not queued.running_trials()):
                self.finish(queued, progress)

    def finish(self, queued: QueuedStudy, progress: bool) -> None:
        """Run what is left of ``queued`` in this process (nothing, unless its workers were lost; other machines'
        trials are waited for), write its tables and call ``after_study``."""
        cfg = dataclasses.replace(queued.cfg, workers=1, storage=storage_url(queued.cfg))
        run(cfg, queued.data, progress, self.command, self.after_export, worker=0)
        queued.finished = True
        if self.after_study is not None:
            self.after_study(Path(cfg.out) / cfg.study)
        log.warning("%s study %s complete", time.strftime("%Y-%m-%dT%H:%M:%S"), cfg.study)

    def lose(self, queued: QueuedStudy, process: subprocess.Popen) -> None:
        """Fail the running trials of the worker ``process`` of ``queued``, which exited with an error, so that their
        points run again; a worker that refused its study (bad input) leaves it an ``error``."""
        storage = open_storage(storage_url(queued.cfg), queued.cfg.heartbeat)
        failed = fail_trials_of(queued.study, storage, process.pid,
                                f"{WORKER_LOST}: worker {process.pid} exited with code {process.returncode}")
        log.warning("worker %d of study %s exited with code %d; %d running trial(s) failed and requeued",
                    process.pid, queued.cfg.study, process.returncode, failed)
        queued.lost += 1
        if process.returncode == BAD_INPUT_EXIT_CODE:
            queued.error = f"study {queued.cfg.study}: its worker refused it (the error above)"

    def errors(self) -> list[str]:
        """Why each study that did not finish could not."""
        return [queued.error or f"study {queued.cfg.study}: not run, since {dependency(queued.cfg)} did not complete"
                for queued in self.studies if not queued.finished]


def run_workers(cfgs: Sequence[SweepConfig], datasets: Sequence[TensorData], progress: bool = True,
                command: str | None = None, after_export: Callable[[Path, pd.DataFrame], object] | None = None,
                after_study: Callable[[Path], object] | None = None) -> None:
    """Run the sweeps ``cfgs`` (one study, or several taking turns) with ``cfgs[0].workers`` local processes, then
    finish in this one what they left.

    Args:
        cfgs: the validated sweeps (:func:`check_queue`), in the order their studies take free workers.
        datasets: each sweep's dataset, for tuning and for the points left to this process.
        progress: show one bar for all the studies.
        command: the command line, recorded beside each study's tables.
        after_export: called with the results folder after every export (see :func:`~continuum.sweep.study.run`).
        after_study: called with a study's results folder once it is complete (its report).

    Raises:
        StopRequested: SIGUSR1 stopped the workers after their epochs in progress.
        ValueError: a study could not run (what it reads could not be read, its worker refused a point); the others
            ran.
    """
    queue = StudyQueue(cfgs, datasets, command, after_export, after_study)
    queue.tune(progress)
    log.warning("%d workers on %s", queue.workers, ", ".join(storage_url(cfg) for cfg in cfgs))
    running: dict[int, tuple[subprocess.Popen, QueuedStudy]] = {}  # by place (its GPU or share of the threads)
    free = list(range(queue.workers))
    names = ", ".join(cfg.study for cfg in cfgs)
    bar = tqdm(desc=f"sweep {names} ({queue.workers} workers)", unit="trial", disable=not progress)
    passed_on = False
    try:
        while True:
            for place, (process, queued) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[place]
                free.append(place)
                if process.returncode != 0 and not (passed_on and process.returncode in STOPPED_EXIT_CODES):
                    queue.lose(queued, process)
            if not passed_on:
                queue.finish_complete(running.values(), progress=False)
                while free and (queued := queue.next_study(running.values())) is not None:
                    queued.started += 1
                    place = free.pop(0)
                    running[place] = (subprocess.Popen(queued.worker_command(),
                                                       env=worker_env(place, queue.workers)), queued)
            if not running:
                break
            if passed_on:
                time.sleep(1)
            elif wait_for_stop(1):  # passed on at once: each worker stops after its epoch in progress
                for process, _ in running.values():
                    process.send_signal(signal.SIGUSR1)
                passed_on = True
            elif progress:
                opened = [queued for queued in queue.studies if queued.study is not None]
                bar.total = sum(queued.total_trials() for queued in opened)
                bar.n = min(sum(queued.done_trials() for queued in opened), bar.total)
                bar.refresh()
    except KeyboardInterrupt:
        for process, _ in running.values():  # SIGTERM: a worker started from a background shell ignores SIGINT
            process.send_signal(signal.SIGTERM)
        for process, _ in running.values():
            process.wait()
        raise
    finally:
        bar.close()
    if stop_requested():
        raise StopRequested("the workers stopped after their epochs in progress")
    for queued in queue.studies:  # points of studies whose workers were lost, other machines' trials
        if not queued.finished and queue.opened(queued):
            queue.finish(queued, progress)
    if queue.errors():
        raise ValueError("; ".join(queue.errors()))
