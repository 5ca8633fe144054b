"""Names, defaults and validation shared by the layers, the models and every front end.

One source of truth: the CLI, model factories, results tables and experiment files all speak the
field names defined here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from typing import Any, Union

Segments = Union[int, str]
"""A segment count: an int >= 1, or ``"all"`` (one segment per channel, i.e. depthwise)."""

ORDERS = ("depthwise_first", "pointwise_first")
"""Operation orders of a separable unit: spatial then 1x1 (Xception) or 1x1 then spatial (extreme Inception)."""

MID_ACTS = (None, "relu", "elu", "gelu", "silu", "leaky_relu", "tanh")
"""Intermediate activations offered by name (any activation class or timm name is accepted by the layers)."""


def parse_segments(value: Segments | str) -> Segments:
    """Turn ``"all"``, ``"8"`` or ``8`` into a checked segment count.

    Args:
        value: an int >= 1, a decimal string, or ``"all"`` (case-insensitive).

    Returns:
        The int count, or the string ``"all"``.

    Raises:
        ValueError: for anything else, naming the accepted forms.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return "all"
        if not text.isdigit():
            raise ValueError(f"segments={value!r} is not valid; use an int >= 1 or 'all'")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"segments={value!r} is not valid; use an int >= 1 or 'all'")
    return value


def parse_order(value: str) -> str:
    """Check an operation order name.

    Args:
        value: ``"depthwise_first"`` or ``"pointwise_first"``; ``-`` may stand for ``_``.

    Raises:
        ValueError: naming the valid orders.
    """
    order = value.strip().lower().replace("-", "_")
    if order not in ORDERS:
        raise ValueError(f"order={value!r} is not valid; choose one of {', '.join(ORDERS)}")
    return order


def parse_mid_act(value: str | None) -> str | None:
    """Normalise an intermediate activation name; ``None``, ``"none"`` and ``""`` mean no activation.

    Args:
        value: an activation name from :data:`MID_ACTS`, or ``None``.

    Raises:
        ValueError: naming the valid activations.
    """
    if value is None or value.strip().lower() in ("", "none"):
        return None
    name = value.strip().lower()
    if name not in MID_ACTS:
        valid = ", ".join("none" if a is None else a for a in MID_ACTS)
        raise ValueError(f"mid_act={value!r} is not valid; choose one of {valid}")
    return name


class ConfigBase:
    """``to_dict`` / ``from_dict`` for the frozen config dataclasses; unknown keys are errors naming known ones."""

    def validate(self):
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the field names used everywhere (CLI, results tables, experiment files)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build and validate from a dict."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data).validate()


def spread(value: Any, parts: tuple[str, ...], name: str) -> dict[str, Any]:
    """Give one knob a value per part of a model (flow or stage).

    Args:
        value: one value for every part; a dict ``{part: value}`` (parts left out keep ``default`` given
            under the key ``"default"``, else error); or a list/tuple with one value per part.
        parts: the part names, in order.
        name: the knob's name, for error messages.

    Returns:
        ``{part: value}`` for every part.

    Raises:
        ValueError: unknown part names, a missing part, or a sequence of the wrong length.
    """
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(parts) - {"default"})
        if unknown:
            raise ValueError(f"{name}: unknown part(s) {unknown}; parts are {list(parts)}")
        missing = [p for p in parts if p not in value]
        if missing and "default" not in value:
            raise ValueError(f"{name}: no value for {missing}; give every part or a 'default'")
        return {p: value.get(p, value.get("default")) for p in parts}
    if isinstance(value, (list, tuple)):
        if len(value) != len(parts):
            raise ValueError(f"{name}: {len(value)} values for {len(parts)} parts {list(parts)}")
        return dict(zip(parts, value))
    return {p: value for p in parts}


RECIPES = ("cosine", "paper_sgd", "paper_rmsprop")
"""Training recipes: SGD + cosine decay; the paper's ImageNet SGD (0.045, x0.94 every 2 epochs); its JFT RMSprop."""

RECIPE_DEFAULTS = {
    "cosine": {"lr": 0.05, "weight_decay": 5e-4},
    "paper_sgd": {"lr": 0.045, "weight_decay": 1e-5},
    "paper_rmsprop": {"lr": 0.001, "weight_decay": 1e-5},
}


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """How one model is trained; knows nothing of the search around it.

    Args:
        epochs: passes over the training images.
        batch_size: images per step.
        recipe: ``"cosine"``, ``"paper_sgd"`` or ``"paper_rmsprop"`` (see :mod:`continuum.train`).
        lr: initial learning rate; ``None`` takes the recipe's.
        weight_decay: L2 weight decay; ``None`` takes the recipe's.
        label_smoothing: cross-entropy label smoothing.
        augment: random crop with padding (and flips where the dataset allows them), on the device.
        device: ``"auto"`` (CUDA when visible, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        compile: run the model through ``torch.compile``.
        deterministic: ask torch for deterministic algorithms (slower on CUDA).
    """

    epochs: int = 3
    batch_size: int = 128
    recipe: str = "cosine"
    lr: float | None = None
    weight_decay: float | None = None
    label_smoothing: float = 0.0
    augment: bool = True
    device: str = "auto"
    compile: bool = False
    deterministic: bool = False

    def validate(self) -> TrainConfig:
        """Check every field, raising ``ValueError`` naming the field and what is valid."""
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} is not valid; train at least 1 epoch")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} is not valid; use an int >= 1")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe={self.recipe!r} is not valid; choose one of {', '.join(RECIPES)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr={self.lr} is not valid; use a positive learning rate")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing={self.label_smoothing} is not valid; use 0 <= value < 1")
        return self

    @property
    def resolved_lr(self) -> float:
        """The initial learning rate in force (the recipe's unless set)."""
        return self.lr if self.lr is not None else RECIPE_DEFAULTS[self.recipe]["lr"]

    @property
    def resolved_weight_decay(self) -> float:
        """The weight decay in force (the recipe's unless set)."""
        return self.weight_decay if self.weight_decay is not None else RECIPE_DEFAULTS[self.recipe]["weight_decay"]


@dataclass(frozen=True)
class DataConfig(ConfigBase):
    """Which images a study trains and validates on.

    Args:
        dataset: ``fashion-mnist``, ``cifar10``, ``cifar100``, ``imagefolder:PATH`` or ``synthetic``.
        data_dir: where to look for (and download) it; ``None``: ``$CONTINUUM_DATA`` and the usual places.
        train_size: training images to use (a fixed random subset); ``None`` or 0: all.
        val_size: validation images to use; ``None`` or 0: all.
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    train_size: int | None = 10_000
    val_size: int | None = 2_000


def parse_bool(value: bool | str) -> bool:
    """``True``/``False``, or ``on``/``off``, ``true``/``false``, ``yes``/``no``, ``1``/``0``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{value!r} is not valid; use on or off")


@dataclass(frozen=True)
class ModelConfig(ConfigBase):
    """One point of a sweep: which model, where on the continuum, how wide.

    Each of ``segments``, ``order``, ``mid_act`` and ``residual`` is one value, or a tuple with one value per stage
    (search mode). Its field names are the columns of the results tables.

    Args:
        model: a registered timm model name.
        segments: segment count(s) of the spatial convs.
        order: operation order(s).
        mid_act: intermediate activation(s).
        residual: shortcut(s) on or off.
        width: width multiplier (models with a ``width_mult`` knob).
        width_divisor: widths are rounded to multiples of it; ``None``: the model's default.
        drop_rate: dropout before the classifier.
    """

    model: str = "continuum_small"
    segments: Any = "all"
    order: Any = "depthwise_first"
    mid_act: Any = None
    residual: Any = True
    width: float = 1.0
    width_divisor: int | None = None
    drop_rate: float = 0.0

    def validate(self) -> ModelConfig:
        """Normalise every knob (one value or a tuple per stage), raising ``ValueError`` on a bad one."""
        def each(value: Any, parse) -> Any:
            return tuple(parse(v) for v in value) if isinstance(value, (list, tuple)) else parse(value)

        if not self.width > 0:
            raise ValueError(f"width={self.width} is not valid; use a positive multiplier")
        return ModelConfig(self.model, each(self.segments, parse_segments), each(self.order, parse_order),
                           each(self.mid_act, parse_mid_act), each(self.residual, parse_bool), float(self.width),
                           self.width_divisor, self.drop_rate)

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model`` (list-valued knobs become per-stage lists).

        A continuum knob at its default is left out, so models without that knob (the Inception baselines) build;
        continuum's own models have the same defaults.
        """
        kwargs = {"drop_rate": self.drop_rate}
        for knob in ("segments", "order", "mid_act", "residual"):
            value = getattr(self, knob)
            if value != _DEFAULT_KNOBS[knob]:
                kwargs[knob] = list(value) if isinstance(value, tuple) else value
        if self.width != 1.0 or self.width_divisor is not None:
            kwargs["width_mult"] = self.width
        if self.width_divisor is not None:
            kwargs["width_divisor"] = self.width_divisor
        return kwargs


_DEFAULT_KNOBS = {f.name: f.default for f in fields(ModelConfig)}

SEARCH_MODES = ("grid", "tpe", "nsga2")
OBJECTIVES = {"val_acc": "maximize", "flops": "minimize", "latency": "minimize", "params": "minimize"}
PRUNERS = ("none", "median", "hyperband")


@dataclass(frozen=True)
class SweepConfig(ConfigBase):
    """Everything ``python -m continuum.sweep`` runs: the axes of the grid or search, and the fixed settings.

    Args:
        models: model names to sweep.
        segments: segment counts (grid axis; search mode draws per stage from them).
        orders: operation orders.
        mid_acts: intermediate activations (``None`` = none).
        residuals: shortcut settings.
        widths: width multipliers.
        seeds: seeds; each grid point runs once per seed.
        drop_rate: dropout before the classifier.
        match_params: scale each point's width to this many parameters (within 2 %); ``None``: off.
        search: ``"grid"``, ``"tpe"`` or ``"nsga2"``.
        n_trials: trials of a search (total in the study; a rerun tops it up).
        objectives: what a search optimises: ``val_acc`` and any of ``flops``, ``latency``, ``params``.
        pruner: ``"none"``, ``"median"`` or ``"hyperband"`` (single-objective only).
        study: study name; results go to ``out/study``.
        storage: Optuna storage URL; ``None``: ``sqlite:///out/study/study.db``.
        out: results root folder.
        retry_failed: rerun points whose trial failed for a lasting reason (non-finite loss, out of memory).
        heartbeat: seconds between trial heartbeats; a trial silent for 3 heartbeats is stale and rerun.
        latency_batch: batch size of the per-trial latency probe.
        workers: local worker processes sharing the study.
        data: the dataset settings.
        train: the training settings.
    """

    models: tuple[str, ...] = ("continuum_small",)
    segments: tuple[Any, ...] = (1, 4, 16, "all")
    orders: tuple[str, ...] = ("depthwise_first",)
    mid_acts: tuple[Any, ...] = (None,)
    residuals: tuple[bool, ...] = (True,)
    widths: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0,)
    drop_rate: float = 0.0
    match_params: int | None = None
    search: str = "grid"
    n_trials: int = 20
    objectives: tuple[str, ...] = ("val_acc",)
    pruner: str = "none"
    study: str = "default"
    storage: str | None = None
    out: str = "results"
    retry_failed: bool = False
    heartbeat: int = 10
    latency_batch: int = 32
    workers: int = 1
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    def validate(self) -> SweepConfig:
        """Normalise the axes and check every setting, raising ``ValueError`` naming the bad one."""
        def nonempty(name: str, values: tuple) -> tuple:
            if not values:
                raise ValueError(f"{name}: give at least one value")
            return tuple(values)

        if self.search not in SEARCH_MODES:
            raise ValueError(f"search={self.search!r} is not valid; choose one of {', '.join(SEARCH_MODES)}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"pruner={self.pruner!r} is not valid; choose one of {', '.join(PRUNERS)}")
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or not self.objectives or self.objectives[0] != "val_acc":
            raise ValueError(f"objectives={','.join(self.objectives)} is not valid; start with val_acc, then any of "
                             "flops, latency, params")
        if len(self.objectives) > 1 and self.pruner != "none":
            raise ValueError("pruning needs a single objective; use --pruner none with several objectives")
        if self.match_params is not None and (self.match_params < 1 or self.widths != (1.0,)):
            raise ValueError("match_params needs a positive count and no explicit widths (it sets the width)")
        if self.n_trials < 1 or self.heartbeat < 1 or self.latency_batch < 1 or self.workers < 1:
            raise ValueError("n_trials, heartbeat, latency_batch and workers must be >= 1")
        if not self.study or any(c in self.study for c in "/\\:") or self.study.startswith("."):
            raise ValueError(f"study={self.study!r} is not valid; use a plain name such as 'spectrum'")
        if any(isinstance(s, bool) or not isinstance(s, int) for s in self.seeds):
            raise ValueError(f"seeds={self.seeds} is not valid; use ints")
        return dataclasses.replace(
            self,
            models=nonempty("models", self.models),
            segments=tuple(parse_segments(s) for s in nonempty("segments", self.segments)),
            orders=tuple(parse_order(o) for o in nonempty("orders", self.orders)),
            mid_acts=tuple(parse_mid_act(a) for a in nonempty("mid_acts", self.mid_acts)),
            residuals=tuple(parse_bool(r) for r in nonempty("residuals", self.residuals)),
            widths=tuple(float(w) for w in nonempty("widths", self.widths)),
            seeds=nonempty("seeds", self.seeds),
            data=self.data.validate(),
            train=self.train.validate(),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepConfig:
        """Build from a flat or nested dict (``data`` / ``train`` as sub-dicts), validating every field."""
        data = dict(data)
        nested = {"data": DataConfig, "train": TrainConfig}
        for key, sub in nested.items():
            if isinstance(data.get(key), dict):
                data[key] = sub.from_dict(data[key])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(known)}")
        listy = {"models", "segments", "orders", "mid_acts", "residuals", "widths", "seeds", "objectives"}
        data = {k: tuple(v) if k in listy and isinstance(v, (list, tuple)) else v for k, v in data.items()}
        return cls(**data).validate()

    def fixed_settings(self) -> dict[str, Any]:
        """The settings every trial of a study must share (a rerun with other values would mix results).

        Where a worker runs (device, compile, data folder) is not among them; a search's choices are, since
        they are stored with its trials and cannot change.
        """
        settings = {
            "data": {k: v for k, v in self.data.to_dict().items() if k != "data_dir"},
            "train": {k: v for k, v in self.train.to_dict().items() if k not in ("device", "compile")},
            "objectives": list(self.objectives), "search": self.search, "drop_rate": self.drop_rate,
            "match_params": self.match_params}
        if self.search != "grid":
            settings["choices"] = {axis: [str(v) for v in getattr(self, axis)] for axis in
                                   ("models", "segments", "orders", "mid_acts", "residuals", "widths", "seeds")}
        return settings
