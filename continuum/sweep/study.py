"""Study control: open or resume a study (refusing other fixed settings), queue a grid's points so each runs
exactly once (and a search's interrupted points again), run trials until the grid or the search is done, and write
the results tables after every trial.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import optuna
import pandas as pd
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from continuum.data import TensorData
from continuum.files import check_writable_folder, made_folder
from continuum.sweep.objective import Objective
from continuum.sweep.points import TrialFailed, grid_points, lr_extensions, point_key, point_taken
from continuum.sweep.settings import OBJECTIVES, STORAGE_FIELDS, SweepConfig
from continuum.sweep.signals import stop_requested
from continuum.sweep.storage import default_storage, move_sqlite_study_to_journal, open_storage, storage_file
from continuum.sweep.tables import StudyTables
from continuum.train import StopRequested

log = logging.getLogger("continuum.sweep")


def storage_url(cfg: SweepConfig) -> str:
    """The study's storage URL: ``--storage`` with ``{out}`` and ``{study}`` replaced by the results root and the
    study's name (so an experiment file's storage follows ``--out``), else a file in the study's results folder (see
    :func:`continuum.sweep.storage.default_storage`)."""
    if not cfg.storage:
        return default_storage(Path(cfg.out) / cfg.study, cfg.workers)
    url = cfg.storage
    for name in STORAGE_FIELDS:
        url = url.replace(f"{{{name}}}", str(getattr(cfg, name)))
    return url


def sampler_seed(cfg: SweepConfig, worker: int | None, drawn: int = 0) -> int:
    """The seed of this process's search sampler, so that parallel workers, and a search resumed, draw different
    configurations.

    From the study's first seed, the process's number and how many trials the study held when the process opened
    it: 0 for a lone process on a file storage (a one-process search reproduces), ``i`` for local worker ``i`` of
    ``--workers N``; a process sharing a database server with others it cannot number mixes in its process id. A
    sampler's random state is not stored with the study: seeded as before, a resumed search would draw again the
    points it drew before its stop.

    Args:
        cfg: the sweep.
        worker: the local worker number, or ``None`` for a process started on its own.
        drawn: the trials the study held when this process opened it.
    """
    if worker is None:
        worker = 0 if storage_url(cfg).startswith(("sqlite:///", "journal:")) else os.getpid()
    return int(np.random.SeedSequence([cfg.seeds[0], worker, drawn]).generate_state(1)[0])


def _sampler(cfg: SweepConfig, worker: int | None, drawn: int = 0) -> optuna.samplers.BaseSampler:
    seed = sampler_seed(cfg, worker, drawn)
    if cfg.search == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if cfg.search == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=cfg.resolved_population, seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # grid trials are all enqueued; it never draws


def _pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.train.epochs)
    return optuna.pruners.NopPruner()


def _settings_diff(stored: dict, current: dict) -> list[str]:
    diff = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [f"{key}.{d}" for d in _settings_diff(a, b)]
        elif json.dumps(a, default=str) != json.dumps(b, default=str):
            diff.append(f"{key} ({a!r} there, {b!r} now)")
    return diff


def open_study(cfg: SweepConfig, storage: optuna.storages.BaseStorage, worker: int | None = None) -> optuna.Study:
    """Create the study, or load it and check it was run with the same fixed settings; ``worker`` seeds the
    sampler (:func:`sampler_seed`).

    Raises:
        ValueError: the existing study's settings differ (nothing is written to it).
    """
    settings = cfg.fixed_settings()
    directions = [OBJECTIVES[o].direction for o in cfg.objectives]
    existing = {s.study_name: s for s in storage.get_all_studies()}
    drawn = 0
    if cfg.study in existing:
        stored = existing[cfg.study].user_attrs.get("settings")
        diff = _settings_diff(stored, settings) if stored is not None else []
        if diff:
            raise ValueError(f"study {cfg.study!r} was run with other settings: {'; '.join(diff)}; "
                             "use --study NEW or the same settings")
        drawn = len(storage.get_all_trials(storage.get_study_id_from_name(cfg.study), deepcopy=False))
    study = optuna.create_study(storage=storage, study_name=cfg.study, directions=directions,
                                sampler=_sampler(cfg, worker, drawn), pruner=_pruner(cfg), load_if_exists=True)
    if "settings" not in study.user_attrs:
        study.set_user_attr("settings", settings)
    if study.metric_names != list(cfg.objectives):
        with warnings.catch_warnings():  # experimental since Optuna 3.2, and what optuna-dashboard reads
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(cfg.objectives))
    return study


def trials_by_point(study: optuna.Study) -> dict[str, list[FrozenTrial]]:
    """The trials of ``study`` that hold a point (a grid's, or a search's: its ``point`` key), by that key."""
    seen: dict[str, list[FrozenTrial]] = defaultdict(list)
    for trial in study.get_trials(deepcopy=False):
        if "point" in trial.user_attrs:
            seen[trial.user_attrs["point"]].append(trial)
    return seen


def plan_grid(study: optuna.Study, keys: Sequence[str], retry_failed: bool) -> int:
    """Enqueue every grid point x seed that no trial has done or holds (:func:`point_taken`); returns how many."""
    seen = trials_by_point(study)
    missing = [key for key in keys if point_taken(seen[key], retry_failed=retry_failed) is None]
    for key in missing:
        study.enqueue_trial({}, user_attrs={"point": key})
    return len(missing)


def plan_search(study: optuna.Study, cfg: SweepConfig) -> int:
    """Queue again the point of every search trial that failed for a transient reason (interrupted, its worker lost
    or gone stale) and that no other trial has done or holds (:func:`point_taken`), while the search is short of
    ``n_trials``; returns how many.

    Each is queued as Optuna retries a stale trial: a copy with its params (drawn no more), its sampler's records
    (NSGA-II's generation) and its ``point``, whose saved training state the rerun resumes. A search thus runs each
    point it drew to the end, as a grid does, and a stop costs no more than the epochs in progress.
    """
    free = cfg.n_trials - count_trials(study, (*DONE, TrialState.RUNNING, TrialState.WAITING))
    lost = [trials for trials in trials_by_point(study).values()
            if point_taken(trials, retry_failed=cfg.retry_failed) is None][:max(0, free)]
    with warnings.catch_warnings():  # experimental since Optuna 2.8, and what a stale trial's retry is
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback()
    for trials in lost:
        retry(study, max(trials, key=lambda t: t.number))
    return len(lost)


def plan(study: optuna.Study, cfg: SweepConfig, grid: Sequence[str]) -> int:
    """Queue what has to run again or still: the ``grid``'s points (:func:`plan_grid`), or a search's interrupted
    ones (:func:`plan_search`); returns how many."""
    return plan_grid(study, grid, cfg.retry_failed) if cfg.search == "grid" else plan_search(study, cfg)


def count_trials(study: optuna.Study, states: Sequence[TrialState], keys: set[str] | None = None) -> int:
    """Trials of ``study`` in ``states``; with ``keys``, only those of these grid points."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=tuple(states))
               if keys is None or t.user_attrs.get("point") in keys)


def check_paths(cfg: SweepConfig) -> None:
    """Refuse, before anything is written, a results folder or storage file that cannot be written: a file where
    a folder should be, a folder where a file should be, or a read-only place.

    Raises:
        ValueError: naming the path and what to do.
    """
    check_writable_folder(Path(cfg.out) / cfg.study, "--out")
    url = storage_url(cfg)
    path = storage_file(url)
    if path is not None:
        if path.is_dir():
            raise ValueError(f"--storage {url}: {path} is a folder; name a file in it")
        if path.exists() and not os.access(path, os.W_OK):
            raise ValueError(f"--storage {url}: {path} is read-only; make it writable or use another storage")


def recorded_trials(folder: Path) -> int:
    """Rows of the study folder's ``trials.csv`` (0 when there is none or it cannot be read)."""
    try:
        return len(pd.read_csv(folder / "trials.csv", usecols=["trial"]))
    except (OSError, ValueError):
        return 0


def lost_study(cfg: SweepConfig, url: str, recorded: int) -> ValueError:
    """The error for a storage file that exists but does not hold a study whose tables exist (emptied, replaced
    or another study's)."""
    return ValueError(f"study {cfg.study!r} is not in {url}, but {Path(cfg.out) / cfg.study / 'trials.csv'} holds "
                      f"{recorded} of its trials: the storage was emptied or is another one; restore it (or "
                      "name the one it used with --storage), or start afresh with --study NEW")


def connect(cfg: SweepConfig, worker: int | None = None) -> optuna.Study:
    """Open (or create) the study of ``cfg`` in its storage, making the results folder first (a storage that
    cannot be opened, or refuses the study, leaves no new folder behind).

    Args:
        cfg: the sweep.
        worker: the local worker number (seeds the sampler), ``None`` for a process started on its own.

    Raises:
        ValueError: a storage file that was there does not hold the study although its tables exist (emptied or
            replaced), or the storage holds it with other settings. A storage that is not there yet (a fresh
            clone's committed tables, a new database) starts a new study, with a warning that its tables replace
            the old ones.
    """
    folder = Path(cfg.out) / cfg.study
    url = storage_url(cfg)
    recorded = recorded_trials(folder)
    with made_folder(folder):  # removed again if the storage cannot be opened or refuses the study
        if cfg.storage is None and url.startswith("journal:"):
            move_sqlite_study_to_journal(folder, cfg.study)
        file = storage_file(url)
        kept = file is not None and file.exists()  # a storage file was here before
        if recorded and kept and file.stat().st_size == 0:
            raise lost_study(cfg, url, recorded)
        storage = open_storage(url, cfg.heartbeat)
        if recorded and cfg.study not in {summary.study_name for summary in storage.get_all_studies()}:
            if kept:
                raise lost_study(cfg, url, recorded)
            log.warning("%s holds %d trials of a study %r that %s does not hold (tables from elsewhere, such as a "
                        "fresh clone's committed results): a new study starts, and its tables replace them",
                        folder / "trials.csv", recorded, cfg.study, url)
        return open_study(cfg, storage, worker)


DONE = (TrialState.COMPLETE, TrialState.PRUNED)
"""States of a trial that has done its point."""


def remaining(study: optuna.Study, cfg: SweepConfig, grid: Sequence[str]) -> int:
    """Trials left to run: the grid's points queued or running (after queueing the missing ones), or a search's
    trials short of ``n_trials`` (after queueing its interrupted points again)."""
    plan(study, cfg, grid)
    if cfg.search == "grid":
        return count_trials(study, (TrialState.WAITING, TrialState.RUNNING), set(grid))
    return max(0, cfg.n_trials - count_trials(study, DONE))


def extend_grid(study: optuna.Study, cfg: SweepConfig, grid: list[str]) -> bool:
    """Add to ``grid`` the points ``lr_extend`` asks for now that its rates have finished
    (:func:`~continuum.sweep.points.lr_extensions`); returns whether any were new.

    Args:
        study: the study, whose finished trials are read.
        cfg: the grid sweep.
        grid: the keys of the grid's points (:func:`~continuum.sweep.points.point_key`), extended in place.
    """
    finished = {t.user_attrs["point"]: t.user_attrs["val_acc"]
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if "point" in t.user_attrs and t.user_attrs.get("val_acc") is not None}
    new = [key for key in map(point_key, lr_extensions(cfg, finished)) if key not in grid]
    if new:
        log.info("%d point(s) at a learning rate beyond the grid's edge, where the best rate was", len(new))
    grid.extend(new)
    return bool(new)


def has_work(study: optuna.Study, cfg: SweepConfig, grid: list[str], wait: bool = True) -> bool:
    """Whether this worker has a trial to run now: a search short of ``n_trials`` or with a point queued again, or a
    queued grid point.

    Fails the trials whose heartbeat went stale, so that their points are queued again (:func:`plan`; a dead
    worker's grid point is rerun first if it saved a state: :meth:`~continuum.sweep.objective.Objective.resume_first`;
    a search's interrupted points run before it draws new ones). Adds the points
    ``lr_extend`` asks for as soon as their rates have finished (:func:`extend_grid`), other points still running or
    not. While only other workers' trials of the grid are running, waits for them (their points may come back, or
    extend the grid) when ``wait``, else answers no at once.

    Args:
        study: the study.
        cfg: the sweep.
        grid: the keys of the grid's points (:func:`~continuum.sweep.points.point_key`), extended in place.
        wait: wait for the other workers' trials; without, a search's running trials count as taken, too.

    Raises:
        StopRequested: SIGUSR1 asked this process to stop (:func:`~continuum.sweep.signals.stop_requested`).
    """
    while True:
        if stop_requested():
            raise StopRequested("stopped between trials")
        with warnings.catch_warnings():  # experimental since Optuna 2.9, and what heartbeats are for
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        plan(study, cfg, grid)  # re-queues points whose worker died or stopped meanwhile
        if cfg.search != "grid":  # a point queued again runs even when the search is done meanwhile: it was drawn
            taken = count_trials(study, DONE if wait else (*DONE, TrialState.RUNNING))
            return taken < cfg.n_trials or count_trials(study, (TrialState.WAITING,)) > 0
        if count_trials(study, (TrialState.WAITING,)):
            return True
        if extend_grid(study, cfg, grid):
            continue  # queued on the next pass
        if not wait or not count_trials(study, (TrialState.RUNNING,), set(grid)):
            return False
        time.sleep(min(cfg.heartbeat, 2))


def run(cfg: SweepConfig, data: TensorData, progress: bool = True, command: str | None = None,
        after_export: Callable[[Path, pd.DataFrame], object] | None = None, worker: int | None = None,
        wait: bool = True) -> optuna.Study:
    """Run (or resume) the sweep ``cfg`` on ``data``, writing its results tables after every trial.

    Args:
        cfg: the validated sweep.
        data: the dataset (already subset as ``cfg.data`` asks).
        progress: tqdm bars for the sweep and each trial.
        command: the command line, recorded in ``command.txt`` beside the tables (once: a resume by the same
            command adds no line).
        after_export: called with the results folder and the trials table after every export (the command line
            writes the summary from it, without reading the tables back).
        worker: the local worker number of ``--workers N`` (seeds a search's sampler), ``None`` on its own.
        wait: stay while only other workers' trials run (:func:`has_work`); without, leave once no trial is free.
    """
    folder = Path(cfg.out) / cfg.study
    study = connect(cfg, worker)
    commands = folder / "command.txt"
    if command and command not in (commands.read_text().splitlines() if commands.exists() else []):
        with open(commands, "a") as handle:
            handle.write(command + "\n")
    grid = [point_key(point) for point in grid_points(cfg)] if cfg.search == "grid" else []
    objective = Objective(cfg, data, progress)
    tables = StudyTables(study, folder)
    bar = tqdm(total=remaining(study, cfg, grid), desc=f"sweep {cfg.study}", unit="trial", disable=not progress)

    def write(study: optuna.Study, *_: object) -> None:
        tables.update()
        tables.write()
        if after_export is not None:
            after_export(folder, tables.trials())

    try:
        while has_work(study, cfg, grid, wait):
            try:
                study.optimize(objective, n_trials=1, catch=(TrialFailed,),
                               callbacks=[write, lambda s, t: bar.update()])
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as err:
                # Optuna refuses to tell a trial that is already finished ("Cannot tell a FAIL trial"): our heartbeat
                # lapsed (the database down too long, the machine suspended or paused), another worker failed the
                # trial, and its point is queued again
                if isinstance(err, ValueError) and not str(err).startswith("Cannot tell a"):
                    raise
                log.warning("trial %d was failed by another worker while this one ran it (its heartbeat lapsed); its "
                            "point is queued again; going on", objective.trial_number)
    finally:
        bar.close()
        write(study)
    return study
