"""The settings of one model and of its training, each declared once with its help text and parser.

A field's metadata (:func:`setting`) is what the command line, experiment files, validation and the results
tables derive from: its flag, help, parser, and whether it is a grid axis or a column of the tables.
:class:`TrainConfig` and :class:`DataConfig` are what :mod:`continuum.train` and :mod:`continuum.data` need;
:class:`ModelConfig` is one point of the continuum (its fields are the point columns of the results tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

from continuum.data import DATASETS
from continuum.knobs import parse_bool, parse_kernel_size, parse_mid_act, parse_order, parse_segments

Parser = Callable[[Any], Any]
"""Turns a value from the command line (text) or an experiment file (TOML types) into a checked value, raising
``ValueError`` with a message that starts from the value."""


def setting(default: Any, help: str, parse: Parser | None = None, *, choices: tuple[str, ...] = (),
            flag: str | None = None, axis: str | None = None, listed: bool = False, group: str = "study",
            search: tuple = (), switch: bool = False) -> Any:
    """A dataclass field with the metadata every front end reads.

    Args:
        default: the default value.
        help: one line for ``--help``.
        parse: checks and converts one value (one item of an axis); default: one of ``choices``.
        choices: the valid values, listed in ``--help``.
        flag: command-line and experiment-file name (``-`` for ``_``); default: the field name.
        axis: for a grid axis, the :class:`ModelConfig` field (or ``"seed"``) each item sets.
        listed: several values (a comma list on the command line, a list in a file); every axis is.
        group: the ``--help`` section: ``axes``, ``data``, ``training`` or ``study``.
        search: what a search explores on this axis when the command leaves it out.
        switch: a flag without a value (``--compile``).
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "parse": parse or choice(choices), "choices": choices, "flag": flag, "axis": axis,
        "listed": listed or axis is not None, "group": group, "search": search, "switch": switch})


def flag_name(field: dataclasses.Field) -> str:
    """The command-line / experiment-file name of a field: its ``flag`` metadata, else its name."""
    return field.metadata.get("flag") or field.name


def integer(low: int | None = None, high: int | None = None) -> Parser:
    """A parser of whole numbers in ``[low, high]`` (ints, NumPy integers, their text); ``3.0`` and ``True`` are
    refused, not coerced."""
    def parse(value: Any) -> int:
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{value!r} is not valid; use a whole number")
        value = int(value)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in {low}..{high}"
            raise ValueError(f"{value} is not valid; use a whole number {bounds}")
        return value
    return parse


def number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False
           ) -> Parser:
    """A parser of finite numbers (Python's, NumPy's, their text) between ``low`` and ``high`` (open ends with
    ``low_open`` / ``high_open``)."""
    def parse(value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{value!r} is not valid; use a number") from None
        if isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
            value = float(value)  # a NumPy number
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{value!r} is not valid; use a finite number")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            left = "" if low is None else f"{low} {'<' if low_open else '<='} "
            right = "" if high is None else f" {'<' if high_open else '<='} {high}"
            raise ValueError(f"{value} is not valid; use {left}value{right}")
        return float(value)
    return parse


def choice(options: tuple[str, ...]) -> Parser:
    """A parser of one of ``options`` (case-insensitive, ``-`` for ``_``)."""
    def parse(value: Any) -> str:
        text = str(value).strip().lower().replace("-", "_") if isinstance(value, str) else value
        if text not in options:
            raise ValueError(f"{value!r} is not valid; choose one of {', '.join(options)}")
        return text
    return parse


def text(value: Any) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r} is not valid; give a non-empty text")
    return value.strip()


def learning_rate(value: Any) -> float:
    """An initial learning rate: a finite number > 0."""
    return number(0, low_open=True)(value)


def optional(parse: Parser) -> Parser:
    """``parse``, with ``None`` and ``""`` meaning unset."""
    def parse_optional(value: Any) -> Any:
        return None if value is None or value == "" else parse(value)
    return parse_optional


def checked(name: str, parse: Parser, value: Any) -> Any:
    """``value`` checked by ``parse``. Parsers say ``VALUE is not valid; HOW TO FIX``; the error names the setting
    in front (``epochs=0 is not valid; use a whole number >= 1``) unless the parser already did.

    Args:
        name: the setting's name as the user wrote it (``epochs``, ``--batch-size``).
        parse: its parser.
        value: the value given.
    """
    try:
        return parse(value)
    except ValueError as err:
        message = str(err)
        raise ValueError(message if message.startswith(f"{name}=") else f"{name}={message}") from None


def comma_items(name: str, text: str) -> list[str]:
    """The items of a comma list (``1, 4,all`` -> ``["1", "4", "all"]``).

    Args:
        name: the setting's name as the user wrote it, for the message about an empty item.
        text: the list as written (only blanks and commas: no items).

    Raises:
        ValueError: an item is empty (``1,,4`` or ``1,4,``), most often a value left out by mistake.
    """
    items = [item.strip() for item in str(text).split(",")]
    if not any(items):
        return []
    if "" in items:
        raise ValueError(f"{name} {text!r} has an empty item; separate the values with single commas, "
                         f"such as {','.join(item for item in items if item)}")
    return items


def comma_list(name: str, parse: Parser, example: str, named: bool = False) -> Callable[[str], list]:
    """A parser of a comma list of one value or more (``1,4,all``), each checked by ``parse``.

    Args:
        name: the setting's name as the user wrote it, for the message about an empty list.
        parse: the parser of one item.
        example: a valid list, shown in that message.
        named: an item's error names the setting in front (:func:`checked`), for parsers that do not.
    """
    def parse_item(item: str) -> Any:
        return checked(name, parse, item) if named else parse(item)

    def parse_list(text: str) -> list:
        items = [parse_item(item) for item in comma_items(name, text)]
        if not items:
            raise ValueError(f"{name}: give at least one value, such as {example}")
        return items
    return parse_list


def argument(parse: Parser) -> Callable[[str], Any]:
    """``parse`` as an ``argparse`` type: a value it refuses ends the command with its message (``error: argument
    --rounds: 0 is not valid; use a whole number >= 1``) and exit code 2."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return convert


def parse_field(field: dataclasses.Field, value: Any) -> Any:
    """``value`` checked by the field's parser (see :func:`checked`)."""
    return checked(flag_name(field).replace("-", "_"), field.metadata["parse"], value)


class ConfigBase:
    """``to_dict`` / ``from_dict`` / ``validate`` for the frozen config dataclasses, from each field's parser."""

    def validate(self):
        """A copy with every field parsed and checked, raising ``ValueError`` naming the bad one."""
        return dataclasses.replace(self, **{f.name: parse_field(f, getattr(self, f.name)) for f in fields(self)
                                            if "parse" in f.metadata})

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


RECIPES = ("cosine", "paper_sgd", "paper_rmsprop")
"""Training recipes: SGD + cosine decay; the paper's ImageNet SGD (0.045, x0.94 every 2 epochs); its JFT RMSprop."""

PRECISIONS = ("auto", "fp32", "bf16")
"""Training precisions: ``bf16`` autocast (float32 weights and sums) or plain ``fp32``; ``auto`` takes bf16 where the
hardware computes it natively (CUDA; CPUs with AVX512-BF16 or AMX) and fp32 elsewhere (emulated bf16 on an AVX2 CPU
trained 9-18x slower)."""

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
        lr: initial learning rate; ``None`` takes the recipe's (a sweep sets it per point: its ``lr`` axis).
        warmup_epochs: epochs of linear learning-rate warm-up (from ``lr / steps`` to ``lr``) before the recipe's
            schedule, which then runs over the remaining steps; 0: none.
        weight_decay: L2 weight decay; ``None`` takes the recipe's.
        label_smoothing: cross-entropy label smoothing.
        augment: random crop with padding (and flips where the dataset allows them), on the device.
        device: ``"auto"`` (CUDA when visible, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        compile: run the model through ``torch.compile``.
        deterministic: ask torch for deterministic algorithms (slower on CUDA).
        precision: ``"auto"``, ``"fp32"`` or ``"bf16"`` (see :data:`PRECISIONS`).
        channels_last: the model and its batches in channels-last memory format (faster on CPUs and GPUs alike).
    """

    epochs: int = setting(3, "epochs per trial", integer(1), group="training")
    batch_size: int = setting(128, "images per step", integer(1), group="training")
    recipe: str = setting("cosine", "training recipe (paper_sgd: 0.045 x0.94 per 2 epochs, scaled)", choices=RECIPES,
                          group="training")
    lr: float | None = None  # not a study setting: the sweep's lr axis sets it per point
    warmup_epochs: float = setting(0.0, "epochs of linear learning-rate warm-up before the recipe's schedule "
                                        "(fractions allowed)", number(0), group="training")
    weight_decay: float | None = setting(None, "L2 weight decay (default: the recipe's)", optional(number(0)),
                                         group="training")
    label_smoothing: float = setting(0.0, "cross-entropy label smoothing", number(0, 1, high_open=True),
                                     group="training")
    augment: bool = setting(True, "random crop with padding and flips: on, off", parse_bool, group="training")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N", text, group="training")
    compile: bool = setting(False, "torch.compile the model", parse_bool, group="training", switch=True)
    deterministic: bool = setting(False, "deterministic algorithms (slower on CUDA)", parse_bool, group="training",
                                  switch=True)
    precision: str = setting("auto", "fp32, bf16 (autocast), or auto: bf16 where the hardware has it",
                             choices=PRECISIONS, group="training")
    channels_last: bool = setting(True, "channels-last memory format for the model and batches: on, off", parse_bool,
                                  group="training")

    def validate(self) -> TrainConfig:
        """A copy with every field checked (the learning rate too), and a warm-up shorter than the run."""
        cfg = super().validate()
        lr = checked("lr", optional(learning_rate), cfg.lr)
        if cfg.warmup_epochs >= cfg.epochs:
            raise ValueError(f"warmup_epochs={cfg.warmup_epochs:g} is not valid; warm up for fewer epochs than the "
                             f"run's {cfg.epochs}")
        return dataclasses.replace(cfg, lr=lr)

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
        holdout: validation images carved, class-stratified, from the training images (a fixed split); the
            dataset's own test split is then scored once, after training, for the reported numbers (by a grid's
            trials; a search's never score it). 0: the test split validates (no test score).
    """

    dataset: str = setting("fashion-mnist", f"the images: {', '.join(DATASETS)}", text, group="data")
    data_dir: str | None = setting(None, "where the dataset is (default: $CONTINUUM_DATA, Debian's, the cache)",
                                   optional(text), group="data")
    train_size: int | None = setting(10_000, "training images used, 0 = all", optional(integer(0)), group="data")
    val_size: int | None = setting(2_000, "validation images used, 0 = all", optional(integer(0)), group="data")
    holdout: int = setting(0, "validation images held out of the training images, class-stratified; the test split "
                              "is then scored once after training, in a grid (0: the test split validates)", integer(0),
                           group="data")


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
        segment_width: channels per segment instead of a count (RegNet's group width); when set, ``segments`` is
            ``None``.
        kernel_size: kernel size(s) of the spatial convs (odd).
        depths: blocks per stage, one count for every stage or a tuple; ``None``: the model's own.
        width: width multiplier (models with a ``width_mult`` knob).
        width_divisor: widths are rounded to multiples of it; ``None``: the model's default.
        drop_rate: dropout before the classifier.
    """

    model: str = "continuum_small"
    segments: Any = "all"
    order: Any = "depthwise_first"
    mid_act: Any = None
    residual: Any = True
    segment_width: Any = None
    kernel_size: Any = 3
    depths: Any = None
    width: float = 1.0
    width_divisor: int | None = None
    drop_rate: float = 0.0

    def validate(self) -> ModelConfig:
        """Normalise every knob (one value or a tuple per stage), raising ``ValueError`` on a bad one."""
        def each(value: Any, parse) -> Any:
            return tuple(parse(v) for v in value) if isinstance(value, (list, tuple)) else parse(value)

        if not self.width > 0:
            raise ValueError(f"width={self.width} is not valid; use a positive multiplier")
        segment_width = None if self.segment_width is None else each(self.segment_width, integer(1))
        return dataclasses.replace(
            self, segments=None if segment_width is not None else each(self.segments, parse_segments),
            order=each(self.order, parse_order), mid_act=each(self.mid_act, parse_mid_act),
            residual=each(self.residual, parse_bool), segment_width=segment_width,
            kernel_size=each(self.kernel_size, parse_kernel_size),
            depths=None if self.depths is None else each(self.depths, integer(1)), width=float(self.width))

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model`` (list-valued knobs become per-stage lists).

        A continuum knob at its default is left out, so models without that knob (the Inception baselines) build;
        continuum's own models have the same defaults.
        """
        kwargs = {"drop_rate": self.drop_rate}
        for knob in ("segments", "order", "mid_act", "residual", "segment_width", "kernel_size", "depths"):
            value = getattr(self, knob)
            if value != _DEFAULT_KNOBS[knob] and not (knob == "segments" and self.segment_width is not None):
                kwargs[knob] = list(value) if isinstance(value, tuple) else value
        if self.width != 1.0 or self.width_divisor is not None:
            kwargs["width_mult"] = self.width
        if self.width_divisor is not None:
            kwargs["width_divisor"] = self.width_divisor
        return kwargs


_DEFAULT_KNOBS = {f.name: f.default for f in fields(ModelConfig)}
