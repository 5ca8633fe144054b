"""The vocabulary every level speaks: segment counts and widths, operation orders, activation names, their parsing,
:class:`SegmentError` (with the layer path) and the channel sizes of each segment.

Imported by the layers, the models, the configs and the sweep alike; imports nothing of continuum's.
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from typing import Any, Iterator, Union

Segments = Union[int, str]
"""A segment count: an int >= 1, or ``"all"`` (one segment per channel, i.e. depthwise)."""

ORDERS = ("depthwise_first", "pointwise_first")
"""Operation orders of a separable unit: spatial then 1x1 (Xception) or 1x1 then spatial (extreme Inception)."""

MID_ACTS = (None, "relu", "elu", "gelu", "silu", "leaky_relu", "tanh")
"""Intermediate activations offered by name (any activation class or timm name is accepted by the layers)."""


def parse_segments(value: Segments | str) -> Segments:
    """Turn ``"all"``, ``"8"`` or ``8`` into a checked segment count.

    Args:
        value: an int >= 1 (a NumPy integer too), a decimal string, or ``"all"`` (case-insensitive).

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
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"segments={value!r} is not valid; use an int >= 1 or 'all'")
    return int(value)


def parse_kernel_size(value: int | str) -> int:
    """Check a spatial kernel size: an odd int >= 1 (so "same" padding is symmetric).

    Raises:
        ValueError: naming the accepted values.
    """
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text.isdigit():
        text = int(text)
    if isinstance(text, bool) or not isinstance(text, int) or text < 1 or text % 2 == 0:
        raise ValueError(f"kernel_size={value} is not valid; use an odd int >= 1 such as 3, 5 or 7")
    return text


PADDING_NAMES = ("same", "valid")
"""Padding given by name, as :class:`torch.nn.Conv2d` takes it."""


def parse_pair(name: str, value: int | tuple[int, int], minimum: int) -> tuple[int, int]:
    """Check a conv geometry knob given as one int or a (height, width) pair, as :class:`torch.nn.Conv2d` takes it.

    Args:
        name: the knob, for the message (``kernel_size``, ``stride``, ``padding``, ``dilation``).
        value: an int, or a pair of ints.
        minimum: the smallest value allowed.

    Raises:
        ValueError: naming the knob and the accepted values.
    """
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    try:
        if len(pair) == 2:
            return parse_whole(name, pair[0], minimum), parse_whole(name, pair[1], minimum)
    except ValueError:
        pass
    raise ValueError(f"{name}={value!r} is not valid; use an int >= {minimum} or a (height, width) pair of them")


def parse_whole(name: str, value: int, minimum: int = 1) -> int:
    """Check a whole-number knob (a channel count, a multiplier): an int or NumPy integer, not a bool.

    Args:
        name: the knob, for the message (``in_channels``, ``depth_multiplier``, ...).
        value: the number.
        minimum: the smallest value allowed.

    Raises:
        ValueError: naming the knob and the accepted values.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} is not valid; use an int >= {minimum}")
    return int(value)


def parse_padding(value: int | tuple[int, int] | str, stride: tuple[int, int]) -> tuple[int, int] | str:
    """Check a conv's padding: an int >= 0, a pair of them, or ``"same"`` / ``"valid"`` (``"same"`` at stride 1).

    Args:
        value: the padding.
        stride: the conv's stride (``"same"`` needs 1).

    Raises:
        ValueError: naming the accepted values.
    """
    if not isinstance(value, str):
        return parse_pair("padding", value, 0)
    if value not in PADDING_NAMES:
        raise ValueError(f"padding={value!r} is not valid; use an int >= 0, a pair of them, or one of "
                         f"{', '.join(PADDING_NAMES)}")
    if value == "same" and stride != (1, 1):
        raise ValueError(f"padding='same' needs stride 1, not {stride}; give the padding as numbers")
    return value


def parse_order(value: str) -> str:
    """Check an operation order name.

    Args:
        value: ``"depthwise_first"`` or ``"pointwise_first"``; ``-`` may stand for ``_``.

    Raises:
        ValueError: naming the valid orders.
    """
    order = value.strip().lower().replace("-", "_") if isinstance(value, str) else value
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


SWITCH_WORDS = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False,
                "no": False}
"""What an on/off setting may say in text (any case, spaces ignored): a flag, a file's value, an environment
variable."""


def parse_bool(value: bool | str) -> bool:
    """``True``/``False``, or one of :data:`SWITCH_WORDS`: ``on``/``off``, ``true``/``false``, ``yes``/``no``,
    ``1``/``0``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in SWITCH_WORDS:
        raise ValueError(f"{value!r} is not valid; use on or off")
    return SWITCH_WORDS[text]


def parse_switch(name: str, value: bool | str) -> bool:
    """A layer's on/off knob (:func:`parse_bool`): ``"no"`` or ``"off"`` must not switch it on, as any non-empty
    text would.

    Args:
        name: the knob, for the message (``residual``, ``uneven``).
        value: ``True``/``False``, or one of :func:`parse_bool`'s words.

    Raises:
        ValueError: naming the knob and the accepted values.
    """
    try:
        return parse_bool(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not valid; use True or False") from None


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


class SegmentError(ValueError):
    """A segment count that does not fit a layer's channels; ``layer`` is the dotted path of that layer."""

    def __init__(self, problem: str, layer: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.layer = layer

    def __str__(self) -> str:
        return f"{self.layer}: {self.problem}" if self.layer else self.problem


@contextmanager
def in_layer(name: str) -> Iterator[None]:
    """Prefix the layer path of any :class:`SegmentError` raised inside with ``name``.

    Args:
        name: the attribute name of the layer being built, e.g. ``"block3"`` or ``"rep.1"``.
    """
    try:
        yield
    except SegmentError as err:
        err.layer = f"{name}.{err.layer}" if err.layer else name
        raise


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _near_equal_split(channels: int, parts: int) -> tuple[int, ...]:
    base, extra = divmod(channels, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def segment_sizes(
    in_channels: int, out_channels: int, segments: Segments, uneven: bool = False
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Channel sizes of each segment on the input and on the output side.

    Args:
        in_channels: input channels of the spatial convolution.
        out_channels: output channels of the spatial convolution.
        segments: int >= 1 or ``"all"`` (one segment per input channel).
        uneven: allow a count that does not divide the channels; segments then get near-equal sizes
            (differing by at most one channel), as Inception towers do.

    Returns:
        ``(in_sizes, out_sizes)``, one entry per segment.

    Raises:
        SegmentError: the count does not fit; the message names the channels and the valid choices.
        ValueError: a channel count that is not an int >= 1.
    """
    segments = parse_segments(segments)
    in_channels, out_channels = parse_whole("in_channels", in_channels), parse_whole("out_channels", out_channels)
    if segments == "all":
        if out_channels % in_channels:
            raise SegmentError(
                f"segments='all' needs out_channels ({out_channels}) to be a multiple of "
                f"in_channels ({in_channels}); use an int segment count instead"
            )
        segments = in_channels
    if in_channels % segments == 0 and out_channels % segments == 0:
        return (in_channels // segments,) * segments, (out_channels // segments,) * segments
    if uneven and segments <= min(in_channels, out_channels):
        return _near_equal_split(in_channels, segments), _near_equal_split(out_channels, segments)
    valid = _divisors(math.gcd(in_channels, out_channels))
    all_valid = " or 'all'" if out_channels % in_channels == 0 else ""
    limit = f"at most {min(in_channels, out_channels)}" if uneven else f"one of {valid}{all_valid}"
    raise SegmentError(
        f"segments={segments} does not fit in_channels={in_channels}, out_channels={out_channels}; "
        f"valid choices: {limit}" + ("" if uneven else " (or uneven=True for near-equal segments)")
    )


def segments_from_width(channels: int, segment_width: int) -> int:
    """Segment count for a given segment width (channels per segment, RegNet's "group width").

    Args:
        channels: channels the spatial convolution sees.
        segment_width: channels per segment; must divide ``channels``.

    Raises:
        SegmentError: the width does not divide the channels, naming the valid widths.
    """
    if segment_width < 1 or channels % segment_width:
        raise SegmentError(
            f"segment_width={segment_width} does not divide {channels} channels; "
            f"valid widths: {_divisors(channels)}"
        )
    return channels // segment_width
