"""Names, defaults and validation shared by the layers, the models and every front end.

One source of truth: the CLI, model factories, results tables and experiment files all speak the
field names defined here.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class BlockConfig:
    """The knobs of one separable unit / residual block.

    Args:
        segments: channel segments of the spatial convolution: 1 = regular conv, ``"all"`` = depthwise.
        order: ``"depthwise_first"`` (spatial then 1x1) or ``"pointwise_first"`` (1x1 then spatial).
        mid_act: activation between the two ops, or ``None`` (the paper's best setting).
        residual: identity / projection shortcut around each block; ``False`` removes it.
    """

    segments: Segments = "all"
    order: str = "depthwise_first"
    mid_act: str | None = None
    residual: bool = True

    def validate(self) -> BlockConfig:
        """Return a normalised copy, raising ``ValueError`` on an invalid field."""
        if not isinstance(self.residual, bool):
            raise ValueError(f"residual={self.residual!r} is not valid; use True or False")
        return BlockConfig(
            segments=parse_segments(self.segments),
            order=parse_order(self.order),
            mid_act=parse_mid_act(self.mid_act),
            residual=self.residual,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the field names used everywhere (CLI, results tables)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockConfig:
        """Build and validate from a dict; unknown keys are an error naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown BlockConfig field(s) {unknown}; known fields: {sorted(known)}")
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
