"""The points of a study: a grid's points and their keys, a search's space, the model of a point (width-matched when
asked), and which trial holds a grid point (so each runs exactly once).
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any, Iterator, Sequence

import optuna
import timm
import torch
from optuna.trial import TrialState

import continuum.models  # noqa: F401  (registers the models with timm)
from continuum.config import ModelConfig
from continuum.data import TensorData
from continuum.knobs import SegmentError
from continuum.sweep.settings import SweepConfig, axis_fields

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


def build_model(config: ModelConfig, data: TensorData) -> torch.nn.Module:
    """The model of one point, sized for ``data`` (channels, classes).

    Raises:
        ValueError: unknown model, a knob the model does not take, or a segment count its layers cannot take.
    """
    if not timm.is_model(config.model):
        raise ValueError(f"model {config.model!r} is not registered; continuum's are "
                         f"{', '.join(timm.list_models('continuum_*'))}")
    kwargs = config.model_kwargs()
    try:
        return timm.create_model(config.model, num_classes=data.num_classes, in_chans=data.input_size[0], **kwargs)
    except TypeError as err:
        raise ValueError(f"model {config.model} does not take these settings ({err}); sweep its own knobs only") \
            from None


def _divisor(segments: Any) -> int:
    counts = [s for s in (segments if isinstance(segments, tuple) else (segments,)) if isinstance(s, int)]
    return math.lcm(*counts) if counts else 1


def match_width(config: ModelConfig, target: int, data: TensorData) -> ModelConfig:
    """The config with the width whose parameter count is closest to ``target`` (widths rounded to multiples of the
    segment count, so the count stays valid).

    Raises:
        ValueError: the model has no width knob, or no width comes within 2 % of ``target``.
    """
    def params(width: float) -> tuple[int, ModelConfig]:
        candidate = ModelConfig(**(config.to_dict() | {"width": width, "width_divisor": _divisor(config.segments)}))
        return sum(p.numel() for p in build_model(candidate, data).parameters()), candidate

    try:
        low, high = 1 / 32, 16.0
        params(1.0)
    except SegmentError:
        raise
    except ValueError as err:
        raise ValueError(f"--match-params needs a model with a width knob (continuum_small): {err}") from None
    for _ in range(40):  # bisection on the (step-wise increasing) parameter count
        middle = math.sqrt(low * high)
        if params(middle)[0] < target:
            low = middle
        else:
            high = middle
    best_count, best = min((params(w) for w in (low, high)), key=lambda pair: abs(pair[0] - target))
    if abs(best_count - target) > MATCH_TOLERANCE * target:
        raise ValueError(f"--match-params {target}: segments={config.segments} gets no closer than {best_count:,} "
                         f"parameters (width {best.width:.3f}); choose another target or allow other segment counts")
    return best


def point_key(config: ModelConfig, seed: int) -> str:
    """The canonical text of a grid point x seed: how a rerun recognises work already done."""
    return json.dumps(config.to_dict() | {"seed": seed}, sort_keys=True, default=list)


def grid_points(cfg: SweepConfig) -> Iterator[tuple[ModelConfig, int]]:
    """Every point x seed of a grid sweep, in run order: the product of the config's axes (outermost first)."""
    axes = axis_fields()
    for values in itertools.product(*(getattr(cfg, field.name) for field in axes)):
        knobs = {field.metadata["axis"]: value for field, value in zip(axes, values)}
        seed = knobs.pop("seed")
        yield ModelConfig(**knobs, drop_rate=cfg.drop_rate).validate(), seed


def suggest_point(trial: optuna.Trial, cfg: SweepConfig) -> tuple[ModelConfig, int]:
    """The search space of ``--search``: per-part segments, order, activation and residual, and the width.

    Choices come from the command only, never from the model, so every trial shares one search space. The seed
    is not searched: trial ``n`` trains with ``seeds[n % len(seeds)]``.
    """
    def per_part(name: str, choices: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(trial.suggest_categorical(f"{name}_{i + 1}", list(choices)) for i in range(STAGES))

    config = ModelConfig(
        model=trial.suggest_categorical("model", list(cfg.models)),
        segments=per_part("segments", cfg.segments), order=per_part("order", cfg.orders),
        mid_act=per_part("mid_act", cfg.mid_acts), residual=per_part("residual", cfg.residuals),
        width=trial.suggest_categorical("width", list(cfg.widths)), drop_rate=cfg.drop_rate).validate()
    return config, cfg.seeds[trial.number % len(cfg.seeds)]  # seeds cycle; not a parameter the sampler tunes


def grid_point(trial: optuna.Trial, retry_failed: bool = False) -> tuple[ModelConfig, int]:
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
    seed = point.pop("seed")
    return ModelConfig.from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in point.items()}), seed


def point_taken(trials: Sequence[optuna.trial.FrozenTrial], before: int | None = None,
                retry_failed: bool = False) -> int | None:
    """The number of a trial that has done or holds a grid point, among ``trials`` of that point, else ``None``.

    Done: COMPLETE or PRUNED, or FAIL for a lasting reason (non-finite loss, out of memory) unless ``retry_failed``.
    Held: WAITING or RUNNING (numbered below ``before`` when given). Trials stopped by Ctrl-C, by a dead worker or
    standing down as duplicates neither do nor hold their point.
    """
    for t in sorted(trials, key=lambda t: t.number):
        reason = t.user_attrs.get("fail_reason") or ""
        lasting_failure = t.state == TrialState.FAIL and reason and not reason.startswith(TRANSIENT_FAILURES)
        live = t.state in (TrialState.WAITING, TrialState.RUNNING) and (before is None or t.number < before)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or live or (lasting_failure and not retry_failed):
            return t.number
    return None
