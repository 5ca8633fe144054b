"""The points of a study: a grid's points and their keys, a search's space, the model of a point (width-matched when
asked), and which trial holds a grid point (so each runs exactly once).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import optuna
import pandas as pd
import timm
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

import continuum.models  # noqa: F401  (registers the models with timm)
from continuum.analysis import best_rate, pareto_front
from continuum.config import ModelConfig, TrainConfig
from continuum.cost import model_cost, saved_bytes_per_image
from continuum.data import TensorData
from continuum.knobs import MID_ACTS, ORDERS, SegmentError
from continuum.sweep.record import point_cells
from continuum.sweep.settings import LATER_AXES, TUNED, SweepConfig, axis_fields, grid_rates, parse_depths
from continuum.train import resolve_precision

log = logging.getLogger("continuum.sweep")

MATCH_TOLERANCE = 0.02
"""``--match-params`` accepts widths giving the target parameter count within this fraction."""

STAGES = 3
"""Parts whose knobs a search sets separately: the small net's stages, or Xception's entry/middle/exit flows."""

DUPLICATE = "duplicate"
"""``fail_reason`` prefix of a trial that stood down because another trial had its grid point."""

WORKER_LOST = "worker lost"
"""``fail_reason`` prefix of a trial whose local worker process died under ``--workers N``."""

INTERRUPTED = "interrupted"
"""``fail_reason`` of a trial stopped by Ctrl-C; such points are rerun on resume, unlike lasting failures."""

TRANSIENT_FAILURES = (INTERRUPTED, DUPLICATE, WORKER_LOST)
"""``fail_reason`` prefixes that say nothing about the point itself: it runs again."""


class TrialFailed(Exception):
    """A trial that failed for a recorded reason; the sweep goes on."""


def creation_kwargs(config: ModelConfig, data: TensorData) -> dict[str, Any]:
    """The keyword arguments ``timm.create_model`` gets for the point's model sized for ``data``."""
    return {"num_classes": data.num_classes, "in_chans": data.input_size[0], **config.model_kwargs()}


def build_model(config: ModelConfig, data: TensorData) -> torch.nn.Module:
    """The model of one point, sized for ``data`` (channels, classes).

    Raises:
        ValueError: unknown model, a knob the model does not take, or a segment count its layers cannot take.
    """
    if not timm.is_model(config.model):
        raise ValueError(f"model {config.model!r} is not registered; continuum's are "
                         f"{', '.join(timm.list_models('continuum_*'))}")
    try:
        return timm.create_model(config.model, **creation_kwargs(config, data))
    except TypeError as err:
        raise ValueError(f"model {config.model} does not take these settings ({err}); sweep its own knobs only") \
            from None


TRAINING_COPIES = 3
"""Copies of its parameters a model needs to train at the least: weights, gradients, momentum (activations come on
top)."""


def free_memory(device: torch.device) -> int | None:
    """Bytes the device can still hand out: a GPU's free memory, the host's available memory (``MemAvailable``);
    ``None`` where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_fits_memory(config: ModelConfig, data: TensorData, device: torch.device, train: TrainConfig,
                      sharing: int = 1) -> None:
    """Refuse a point whose model cannot train in the device's free memory, from a lower bound of what one step
    needs: its parameters times :data:`TRAINING_COPIES` in float32, plus the activations a batch keeps for the
    backward pass (:func:`saved_bytes_per_image`, half of them where bf16 autocast runs), for each of
    ``sharing`` workers on the device. The model is built on the meta device: nothing is allocated.

    Args:
        config: the point (after width matching).
        data: the data it trains on (channels, classes, image size, training images).
        device: where it trains.
        train: its training settings (batch size, precision).
        sharing: workers training at once on the device.

    Raises:
        ValueError: naming the point's size, the memory it needs and the memory there is; or the errors of
            :func:`build_model`.
    """
    try:
        with torch.device("meta"):
            model = build_model(config, data)
    except RuntimeError as err:  # a size that does not fit in 64 bits
        raise ValueError(f"{config.model} at width {config.width:g} is too large to build ({err}); use a smaller "
                         "--width") from None
    image = tuple(data.train_x.shape[1:])
    try:
        per_image = saved_bytes_per_image(model, image)
    except RuntimeError as err:  # an image too small for the model's strides
        raise ValueError(f"{config.model} cannot take {data.name}'s {'x'.join(map(str, image))} images "
                         f"({str(err).splitlines()[0]}); choose a model for this image size") from None
    batch = min(train.batch_size, len(data.train_y))  # a batch larger than the data is the whole data
    if batch == 1:
        try:
            model.train()(torch.zeros(1, *image, device="meta"))
        except ValueError as err:  # batch norm of one value per channel
            raise ValueError(f"{config.model} cannot train on batches of one image ({err}); use --batch-size 2 or "
                             "more") from None
    params = sum(p.numel() for p in model.parameters())
    activations = per_image * batch // (2 if resolve_precision(train.precision, device) == "bf16" else 1)
    weights = params * 4 * TRAINING_COPIES
    need, free = (weights + activations) * sharing, free_memory(device)
    if free is not None and need > free:
        workers = f" for each of {sharing} workers" if sharing > 1 else ""
        where = "this machine" if device.type == "cpu" else str(device)
        raise ValueError(f"{config.model} at width {config.width:g} with batches of {batch:,} images needs at least "
                         f"{_size(need / sharing)} to train{workers} ({params:,} parameters: {_size(weights)}; "
                         f"activations: {_size(activations)}), and {where} has {_size(free)} free; use a smaller "
                         "--batch-size or --width (or fewer --workers)")


def _size(size: float) -> str:
    """A size in bytes in MiB below 1 GiB, else GiB (``3.4 MiB``, ``1.2 GiB``, ``1,024.0 GiB``)."""
    return f"{size / 2**20:.1f} MiB" if size < 2**30 else f"{size / 2**30:,.1f} GiB"


def _divisor(config: ModelConfig) -> int:
    """What every width must be a multiple of for the point's segment counts (or segment widths) to fit."""
    counts = [s for knob in (config.segments, config.segment_width)
              for s in (knob if isinstance(knob, tuple) else (knob,)) if isinstance(s, int)]
    return math.lcm(*counts) if counts else 1


MATCHED = {"params": "parameters", "flops": "FLOPs per image"}
"""What ``--match-params`` / ``--match-flops`` hold equal across points."""


MATCHED_WIDTHS: dict[tuple, ModelConfig] = {}
"""The widths :func:`match_width` found in this process, by point, target, measure and image size and classes (what
a count depends on): the parent's checks, its tuning and each trial ask for the same point's width, a search of some
40 models built and counted."""


def match_width(config: ModelConfig, target: int, data: TensorData, measure: str = "params") -> ModelConfig:
    """The config with the width whose parameter count (or FLOPs per image, ``measure="flops"``) is closest to
    ``target`` (widths rounded to multiples of the segment count or width, so the point stays valid). The candidate
    models are built on the meta device: counting them allocates nothing; a point's width is searched once per
    process (:data:`MATCHED_WIDTHS`).

    Raises:
        ValueError: the model has no width knob, or no width comes within 2 % of ``target``.
    """
    key = (model_key(config), target, measure, data.input_size, data.num_classes)
    if key not in MATCHED_WIDTHS:
        MATCHED_WIDTHS[key] = _searched_width(config, target, data, measure)
    return MATCHED_WIDTHS[key]


def _searched_width(config: ModelConfig, target: int, data: TensorData, measure: str) -> ModelConfig:
    """:func:`match_width`'s search: a bisection on the width, each candidate built on the meta device and counted."""
    def count(width: float) -> tuple[int, ModelConfig]:
        candidate = ModelConfig(**(config.to_dict() | {"width": width, "width_divisor": _divisor(config)}))
        with torch.device("meta"):  # shapes only: nothing allocated, however wide
            model = build_model(candidate, data)
        if measure == "flops":
            return model_cost(model, data.input_size).flops, candidate
        return sum(p.numel() for p in model.parameters()), candidate

    flag = f"--match-{measure}"
    try:
        low, high = 1 / 32, 16.0
        count(1.0)
    except SegmentError:
        raise
    except ValueError as err:
        raise ValueError(f"{flag} needs a model with a width knob (continuum_small): {err}") from None
    for _ in range(40):  # bisection on the (step-wise increasing) count
        middle = math.sqrt(low * high)
        if count(middle)[0] < target:
            low = middle
        else:
            high = middle
    best_count, best = min((count(w) for w in (low, high)), key=lambda pair: abs(pair[0] - target))
    if abs(best_count - target) > MATCH_TOLERANCE * target:
        where = f"segment_width={config.segment_width}" if config.segment_width else f"segments={config.segments}"
        raise ValueError(f"{flag} {target}: {where} gets no closer than {best_count:,} {MATCHED[measure]} "
                         f"(width {best.width:.3f}); choose another target or allow other segment counts")
    return best


def matched(config: ModelConfig, cfg: SweepConfig, data: TensorData) -> ModelConfig:
    """The point as the sweep trains it: width-matched to ``--match-params`` or ``--match-flops`` when set."""
    if cfg.match_params:
        return match_width(config, cfg.match_params, data, "params")
    if cfg.match_flops:
        return match_width(config, cfg.match_flops, data, "flops")
    return config


KEYED_WHEN_SET = {f.metadata["axis"]: f.default[0] for f in axis_fields() if f.name in LATER_AXES}
"""Knobs added after studies had been run (:data:`~continuum.sweep.settings.LATER_AXES`): a point's key names them
only when they differ from these defaults, so an existing study's points keep their keys (and a rerun still finds
them done)."""


class GridPoint(NamedTuple):
    """One trial of a grid: the model's point, its learning rate (``None``: the recipe's) and its seed."""

    config: ModelConfig
    lr: float | None
    seed: int


def model_key(config: ModelConfig) -> str:
    """The canonical text of a model: the same for every learning rate and seed of a point."""
    return json.dumps(config.to_dict(), sort_keys=True, default=list)


def unique_models(configs: Iterable[ModelConfig]) -> list[ModelConfig]:
    """``configs`` each once (by :func:`model_key`), in their first order."""
    return list({model_key(config): config for config in configs}.values())


def point_key(point: GridPoint) -> str:
    """The canonical text of a grid point: how a rerun recognises work already done."""
    knobs = point.config.to_dict() | {"lr": point.lr}
    knobs = {k: v for k, v in knobs.items() if k not in KEYED_WHEN_SET or v != KEYED_WHEN_SET[k]}
    return json.dumps(knobs | {"seed": point.seed}, sort_keys=True, default=list)


def grid_points(cfg: SweepConfig) -> Iterator[GridPoint]:
    """Every point x learning rate x seed of a grid sweep, in run order: the product of the config's axes
    (outermost first), or with ``retrain`` the search's best configurations (:func:`front_configs`) x learning
    rates x seeds; with ``lr=tuned``, each point's rate from the ``lr_study`` (:func:`tuned_lr`).

    Raises:
        ValueError: ``lr=tuned`` and the ``lr_study`` has no finished trial of some point, or ``retrain`` names a
            study without finished trials.
    """
    tried = finished_trials(cfg, "lr_study", REQUIRED_COLUMNS) if cfg.lrs == (TUNED,) else None
    if cfg.retrain is not None:
        points = itertools.product(front_configs(cfg), cfg.lrs, cfg.seeds)
    else:
        points = (_axis_point(cfg, values) for values in itertools.product(*(getattr(cfg, f.name)
                                                                               for f in axis_fields())))
    for config, lr, seed in points:
        yield GridPoint(config, lr if tried is None else tuned_lr(config, cfg, tried), seed)


def grid_models(cfg: SweepConfig) -> list[ModelConfig]:
    """The models of a grid's points, each once, in run order, without their learning rates (so without reading
    the ``lr_study``); none for ``retrain``, whose models come from the finished search."""
    if cfg.retrain is not None:
        return []
    combinations = itertools.product(*(getattr(cfg, f.name) for f in axis_fields()))
    configs = (_axis_point(cfg, values)[0] for values in combinations)
    return unique_models(configs)


def lr_extensions(cfg: SweepConfig, finished: dict[str, float]) -> list[GridPoint]:
    """With ``lr_extend``, the grid points one factor-2 step beyond the edge of the learning rates: for each model
    point whose rates (every seed of each) have all finished, where the rate with the best mean validation accuracy
    (ties to the smaller, as :func:`tuned_lr` chooses) is the smallest or the largest, the same point at half or
    twice that rate, for every seed. Only one step: the points added are not themselves extended.

    Args:
        cfg: the grid sweep.
        finished: the validation accuracy of each finished grid point, by its key (:func:`point_key`).
    """
    if not cfg.lr_extend:
        return []
    rates = grid_rates(cfg)
    by_model: dict[str, list[GridPoint]] = {}
    for point in grid_points(cfg):
        by_model.setdefault(model_key(point.config), []).append(point)
    added = []
    for points in by_model.values():
        scores = {rate: [finished.get(point_key(p)) for p in points if p.lr == rate] for rate in rates}
        if any(None in accuracies for accuracies in scores.values()):
            continue  # a rate still to finish
        best = best_rate(pd.Series({rate: sum(accuracies) / len(accuracies) for rate, accuracies in scores.items()}))
        beyond = best / 2 if best == rates[0] else best * 2 if best == rates[-1] else None
        if beyond is not None:
            added += [p._replace(lr=beyond) for p in points if p.lr == best]
    return added


def _axis_point(cfg: SweepConfig, values: Sequence[Any]) -> tuple[ModelConfig, Any, int]:
    """The config, learning rate and seed of one combination of the axes' values (in :func:`axis_fields` order)."""
    knobs = {field.metadata["axis"]: value for field, value in zip(axis_fields(), values)}
    seed, lr = knobs.pop("seed"), knobs.pop("lr")
    return ModelConfig(**knobs, drop_rate=cfg.drop_rate).validate(), lr, seed


REQUIRED_COLUMNS = ("state", "lr", "val_acc", *(f.name for f in fields(ModelConfig)))
"""What another study's ``trials.csv`` must hold to be read for its learning rates or configurations."""


def finished_trials(cfg: SweepConfig, option: str, columns: Sequence[str]) -> pd.DataFrame:
    """The finished trials of the study ``cfg.<option>`` names (its ``trials.csv`` under the same results root),
    every cell as the text written.

    Args:
        cfg: the sweep.
        option: ``lr_study`` (whose trials tried the learning rates) or ``retrain`` (the search).
        columns: the columns the table must have.

    Raises:
        ValueError: the table is missing, unreadable, lacks a column, or has no finished trial.
    """
    study = getattr(cfg, option)
    path = Path(cfg.out) / study / "trials.csv"
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ValueError(f"{option}={study}: no {path}; run that study first") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{option}={study}: {path} is not a results table ({type(err).__name__})") from None
    missing = sorted(set(columns) - set(table))
    if missing:
        raise ValueError(f"{option}={study}: {path} lacks the columns {missing}; rerun that study")
    done = table[table["state"] == "COMPLETE"]
    if done.empty:
        raise ValueError(f"{option}={study}: {path} has no finished trial; finish that study first")
    return done


def table_config(row: pd.Series) -> ModelConfig:
    """The :class:`~continuum.config.ModelConfig` a row of ``trials.csv`` shows (the inverse of
    :func:`~continuum.sweep.record.point_cells`: per-stage values split at ``/``, ``none`` and empty cells as
    ``None``).

    Raises:
        ValueError: a cell is not a valid value of its knob.
    """
    def cell(name: str) -> Any:
        text = str(row[name]).strip()
        if text.lower() in ("", "none", "nan"):
            return None
        parts = tuple(part.strip() for part in text.split("/"))
        return parts if len(parts) > 1 else text

    knobs = {f.name: cell(f.name) for f in fields(ModelConfig)}
    for name in ("residual", "kernel_size", "drop_rate"):  # columns older tables may leave empty: the default
        if knobs[name] is None:
            knobs[name] = ModelConfig.__dataclass_fields__[name].default
    try:
        knobs["width"] = float(knobs["width"])
        knobs["drop_rate"] = float(knobs["drop_rate"])
        knobs["width_divisor"] = None if knobs["width_divisor"] is None else int(float(knobs["width_divisor"]))
        return ModelConfig(**knobs).validate()
    except (TypeError, ValueError) as err:
        raise ValueError(f"trial {row.get('trial', '?')}'s configuration cannot be read back ({err})") from None


def front_configs(cfg: SweepConfig) -> list[ModelConfig]:
    """The ``retrain_top`` configurations of the ``retrain`` search's Pareto front in validation accuracy (higher
    is better) and FLOPs per image (lower is better), best validation accuracy first. A configuration the search
    trained several times counts once, with its best trial.

    Raises:
        ValueError: the search's table cannot be read, or has no finished trial.
    """
    done = finished_trials(cfg, "retrain", (*REQUIRED_COLUMNS, "flops"))
    scores = done.assign(val_acc=pd.to_numeric(done["val_acc"], errors="coerce"),
                         flops=pd.to_numeric(done["flops"], errors="coerce"))
    front = pareto_front(scores, "val_acc", "flops").sort_values("val_acc", ascending=False, kind="stable")
    configs: list[ModelConfig] = []
    for _, row in front.iterrows():
        config = table_config(row)
        if config not in configs:
            configs.append(config)
    return configs[:cfg.retrain_top]


def tuned_lr(config: ModelConfig, cfg: SweepConfig, tried: pd.DataFrame) -> float:
    """The learning rate of ``config`` with the best mean validation accuracy among ``tried`` (the lr study's
    finished trials of the same point; its width is not compared when ``cfg`` matches parameters or FLOPs, since
    matching sets it); ties go to the smaller rate.

    Raises:
        ValueError: no finished trial of the point (one tried rate only is logged as a warning).
    """
    cells = {k: str(v) for k, v in point_cells(config.to_dict()).items() if k in {f.name for f in fields(ModelConfig)}}
    if cfg.match_params or cfg.match_flops:
        cells = {k: v for k, v in cells.items() if k not in ("width", "width_divisor")}
    rows = tried[(tried[list(cells)] == pd.Series(cells)).all(axis=1)]
    if rows.empty:
        shown = ", ".join(f"{k}={cells[k]}" for k in varied_knobs(cfg) if k in cells) or config.model
        raise ValueError(f"lr_study={cfg.lr_study} has no finished trial of {shown}; run it with the same points "
                         "first")
    means = rows.assign(lr=rows["lr"].astype(float), val_acc=rows["val_acc"].astype(float)).groupby("lr")["val_acc"]
    if means.ngroups < 2:
        log.warning("lr_study=%s tried one learning rate only at %s", cfg.lr_study, cells)
    scores = means.mean()
    return best_rate(scores)


def suggest_point(trial: optuna.Trial, cfg: SweepConfig) -> tuple[ModelConfig, int]:
    """The search space of ``--search``: per-part segments, order, activation and residual, and the width.

    Choices come from the command only, never from the model, so every trial shares one search space. The seed
    is not searched: trial ``n`` trains with ``seeds[n % len(seeds)]``.
    """
    def per_part(name: str, choices: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(trial.suggest_categorical(f"{name}_{i + 1}", list(choices)) for i in range(STAGES))

    def one_of(name: str, choices: Sequence[Any]) -> Any:  # a later axis: searched only when given several values
        return trial.suggest_categorical(name, list(choices)) if len(choices) > 1 else choices[0]

    depths = one_of("depths", ["/".join(map(str, d)) if isinstance(d, tuple) else d for d in cfg.depths])
    config = ModelConfig(
        model=trial.suggest_categorical("model", list(cfg.models)),
        segments=per_part("segments", cfg.segments), order=per_part("order", cfg.orders),
        mid_act=per_part("mid_act", cfg.mid_acts), residual=per_part("residual", cfg.residuals),
        segment_width=one_of("segment_width", cfg.segment_widths), kernel_size=one_of("kernel_size", cfg.kernel_sizes),
        depths=parse_depths(depths), width=trial.suggest_categorical("width", list(cfg.widths)),
        drop_rate=cfg.drop_rate).validate()
    return config, cfg.seeds[trial.number % len(cfg.seeds)]  # seeds cycle; not a parameter the sampler tunes


SEGMENTS_ALL = 2**16
"""How ``segments="all"`` shows as a number among a grid trial's Optuna params: more segments than any layer has
channels, that is one per channel (the far end of the dashboard's log-scaled segments axis)."""


def point_params(config: ModelConfig, lr: float, knobs: Sequence[str]) -> dict[str, tuple[Any, BaseDistribution]]:
    """A grid point's ``knobs`` as Optuna params ``{name: (value, distribution)}``, so that optuna-dashboard lists
    them and plots against them.

    Every distribution is fixed (numbers over a wide range, names over their whole vocabulary), never the grid's
    own values: Optuna refuses a parameter whose distribution changes within a study, and a rerun may grow the
    grid. Knobs a distribution cannot hold (a per-stage tuple, a model not of continuum's) are left out.
    """
    params = {
        "model": (config.model, CategoricalDistribution(sorted(timm.list_models("continuum_*")))),
        "segments": (SEGMENTS_ALL if config.segments == "all" else config.segments,
                     IntDistribution(1, SEGMENTS_ALL, log=True)),
        "order": (config.order, CategoricalDistribution(ORDERS)),
        "mid_act": ("none" if config.mid_act is None else config.mid_act,
                    CategoricalDistribution(["none" if act is None else act for act in MID_ACTS])),
        "residual": (config.residual, CategoricalDistribution((True, False))),
        "width": (config.width, FloatDistribution(1 / 64, 64.0, log=True)),
        "lr": (lr, FloatDistribution(1e-6, 100.0, log=True)),
    }

    def fits(value: Any, distribution: BaseDistribution) -> bool:
        if isinstance(distribution, CategoricalDistribution):
            return value in distribution.choices
        return isinstance(value, (int, float)) and distribution.low <= value <= distribution.high

    return {name: (value, dist) for name, (value, dist) in params.items() if name in knobs and fits(value, dist)}


def varied_knobs(cfg: SweepConfig) -> list[str]:
    """The knobs a grid varies: its axes with several values (and the width, when it is matched). Only
    these are shown as params: a constant one would only add noise to the dashboard's importance plot. The seed
    is a replicate, not a knob; it stays in the ``config`` user attribute."""
    varied = [f.metadata["axis"] for f in axis_fields()
              if f.metadata["axis"] != "seed" and len(getattr(cfg, f.name)) > 1
              and (cfg.retrain is None or f.metadata["axis"] == "lr")]  # a retrain's architectures are the search's
    matching = cfg.match_params or cfg.match_flops
    return varied + (["width"] if matching and "width" not in varied else []) + (["lr"] if cfg.lrs == (TUNED,) else [])


def show_point(trial: optuna.Trial, config: ModelConfig, lr: float, knobs: Sequence[str]) -> None:
    """Record a grid trial's :func:`point_params` on it (directly in the storage: the sampler draws nothing). A
    parameter an older study recorded with another distribution is left out rather than refused."""
    for name, (value, distribution) in point_params(config, lr, knobs).items():
        try:
            trial.storage.set_trial_param(trial._trial_id, name, distribution.to_internal_repr(value), distribution)
        except ValueError:
            pass


def search_point(trial: optuna.Trial, cfg: SweepConfig) -> GridPoint:
    """The point the sampler draws for a search trial (:func:`suggest_point`) at the search's learning rate.

    The trial keeps the point's key (``point``, as a grid trial does) unless another live trial holds the same
    point: its saved training state goes by that key, and when it is interrupted its point is queued again with its
    params (:func:`~continuum.sweep.study.plan_search`). Such a rerun, drawing nothing, takes its original's seed
    and stands down like a grid's duplicate when another trial has done or holds the point (:func:`grid_point`).

    Args:
        trial: the trial just taken from the study (a new one, or a queued rerun).
        cfg: the search.
    """
    config, seed = suggest_point(trial, cfg)  # a rerun's params are its original's: stored, not drawn again
    if "point" in trial.user_attrs:
        return grid_point(trial, cfg.retry_failed)
    point = GridPoint(config, cfg.lrs[0], seed)
    key = point_key(point)
    live = trial.study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    if not any(t.user_attrs.get("point") == key and t.number != trial.number for t in live):
        trial.set_user_attr("point", key)
    return point


def grid_point(trial: optuna.Trial, retry_failed: bool = False) -> GridPoint:
    """The enqueued point of a grid trial (its ``point`` user attribute).

    Workers enqueueing at the same time may queue a point twice; the trial then stands down (fails as a
    duplicate, training nothing) unless it is the lowest-numbered live trial of its point, so each point runs once.

    Grid values are not Optuna params: a study's categorical choices are fixed once stored, and a grid may grow
    (a rerun with more segment counts adds points to the same study).
    """
    if "point" not in trial.user_attrs:
        trial.set_user_attr("fail_reason", "no grid point left (another worker took the last one)")
        raise TrialFailed("no grid point left")
    key = trial.user_attrs["point"]
    others = [t for t in trial.study.get_trials(deepcopy=False)
              if t.user_attrs.get("point") == key and t.number != trial.number]
    taken = point_taken(others, before=trial.number, retry_failed=retry_failed)
    if taken is not None:
        trial.set_user_attr("fail_reason", f"{DUPLICATE}: trial {taken} has this point")
        raise TrialFailed(DUPLICATE)
    point = json.loads(key)
    seed, lr = point.pop("seed"), point.pop("lr", None)
    return GridPoint(ModelConfig.from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in point.items()}), lr,
                     seed)


def point_taken(trials: Sequence[optuna.trial.FrozenTrial], before: int | None = None,
                retry_failed: bool = False) -> int | None:
    """The number of a trial that has done or holds a grid point, among ``trials`` of that point, else ``None``.

    Done: COMPLETE or PRUNED, or FAIL for a lasting reason (non-finite loss, out of memory); with ``retry_failed``
    the point's first such failure does not count, its second does (the point is rerun once, not for ever). Held:
    WAITING or RUNNING (numbered below ``before`` when given). Trials stopped by Ctrl-C, by a dead worker or standing
    down as duplicates neither do nor hold their point.
    """
    retries_left = int(retry_failed)
    for t in sorted(trials, key=lambda t: t.number):
        reason = t.user_attrs.get("fail_reason") or ""
        lasting_failure = t.state == TrialState.FAIL and reason and not reason.startswith(TRANSIENT_FAILURES)
        live = t.state in (TrialState.WAITING, TrialState.RUNNING) and (before is None or t.number < before)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or live or (lasting_failure and not retries_left):
            return t.number
        retries_left -= bool(lasting_failure)
    return None
