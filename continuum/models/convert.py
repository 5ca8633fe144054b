"""Turn any model's k x k convolutions into points of the continuum.

:func:`plan_conversion` says what would happen to each convolution; :func:`convert` returns a converted copy.
Weights are carried over: each new segment keeps the kernel entries of the old convolution that fall inside it.
Moving toward *fewer* segments (a depthwise or grouped conv whose groups the new count divides) keeps every
entry and puts zeros across segments, so the converted model computes exactly the same function.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from continuum.block import ContinuumConv, LayerSpec, SegmentedConv2d
from continuum.knobs import Segments, SegmentError, parse_order, parse_segments, parse_switch, parse_whole, \
    segment_sizes, segments_from_width
from continuum.cost import conv_segment_sizes


@dataclass(frozen=True)
class ConvPlan:
    """What :func:`convert` does to one convolution.

    Args:
        layer: dotted name in the model.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: spatial kernel size.
        segments_before: segments (groups) of the original convolution.
        segments_after: segments after conversion (``None`` when left as it is).
        action: ``"segmented"`` (a ``SegmentedConv2d`` with carried-over weights), ``"separable"`` (a
            ``ContinuumConv`` with fresh weights), ``"unchanged"`` or ``"skipped"``.
        exact: the converted layer computes the same function as the original.
        reason: why it was skipped or left unchanged.
    """

    layer: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    segments_before: int
    segments_after: int | None
    action: str
    exact: bool
    reason: str = ""


def _blocks(in_sizes: tuple[int, ...], out_sizes: tuple[int, ...]) -> list[tuple[slice, slice]]:
    """``(output slice, input slice)`` of each segment's block in the ``out x in`` dense weight."""
    blocks, o, i = [], 0, 0
    for in_size, out_size in zip(in_sizes, out_sizes):
        blocks.append((slice(o, o + out_size), slice(i, i + in_size)))
        o, i = o + out_size, i + in_size
    return blocks


def _block_mask(in_sizes: tuple[int, ...], out_sizes: tuple[int, ...]) -> torch.Tensor:
    """``out x in`` boolean mask of the weight entries a segmented conv holds (its block diagonal)."""
    mask = torch.zeros(sum(out_sizes), sum(in_sizes), dtype=torch.bool)
    for rows, cols in _blocks(in_sizes, out_sizes):
        mask[rows, cols] = True
    return mask


def _target_sizes(conv: nn.Module, segments: Segments, segment_width: int | None, uneven: bool):
    if segment_width is not None:
        segments = segments_from_width(conv.in_channels, segment_width)
    return segment_sizes(conv.in_channels, conv.out_channels, segments, uneven)


def _plan_one(name: str, conv: nn.Module, segments: Segments, order: str | None, segment_width: int | None,
              uneven: bool) -> ConvPlan:
    kernel = tuple(conv.kernel_size)
    before_in, before_out = conv_segment_sizes(conv)
    base = dict(layer=name, in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=kernel,
                segments_before=len(before_in))
    if max(kernel) == 1:
        return ConvPlan(**base, segments_after=None, action="unchanged", exact=True, reason="1x1 conv")
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        return ConvPlan(**base, segments_after=None, action="skipped", exact=False,
                        reason=f"padding_mode={conv.padding_mode!r} is not supported")
    try:
        after_in, after_out = _target_sizes(conv, segments, segment_width, uneven)
    except SegmentError as err:
        return ConvPlan(**base, segments_after=None, action="skipped", exact=False, reason=str(err))
    if order is not None:
        return ConvPlan(**base, segments_after=len(after_in), action="separable", exact=False,
                        reason="replaced by a separable unit with fresh weights")
    if (after_in, after_out) == (before_in, before_out):
        return ConvPlan(**base, segments_after=None, action="unchanged", exact=True,
                        reason="already at this segment count")
    kept = _block_mask(before_in, before_out) & ~_block_mask(after_in, after_out)
    return ConvPlan(**base, segments_after=len(after_in), action="segmented", exact=not kept.any())


def _convertible(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if type(m) in (nn.Conv2d, SegmentedConv2d)}


def plan_conversion(
    model: nn.Module,
    segments: Segments = "all",
    order: str | None = None,
    segment_width: int | None = None,
    uneven: bool = False,
) -> list[ConvPlan]:
    """What :func:`convert` would do to each 2-d convolution of ``model`` (``pandas.DataFrame(plan)`` tabulates it).

    Args:
        model: any model; only ``nn.Conv2d`` and ``SegmentedConv2d`` layers are considered (subclasses such as
            timm's dynamic-padding ``Conv2dSame`` are left out, their padding being their own).
        segments: target segment count, int or ``"all"``.
        order: ``None`` keeps each conv a single spatial conv; ``"depthwise_first"`` / ``"pointwise_first"``
            replaces it by a :class:`ContinuumConv` (spatial + 1x1) with fresh weights.
        segment_width: channels per segment instead of a count.
        uneven: near-equal segments where the count does not divide a layer's channels (else it is skipped).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model is a {type(model).__name__}, not a torch.nn.Module")
    segments = parse_segments(segments)
    order = None if order is None else parse_order(order)
    segment_width = None if segment_width is None else parse_whole("segment_width", segment_width)
    uneven = parse_switch("uneven", uneven)
    return [_plan_one(name, conv, segments, order, segment_width, uneven)
            for name, conv in _convertible(model).items()]


def _kernels(conv: nn.Module) -> list[torch.Tensor]:
    if isinstance(conv, SegmentedConv2d):
        return conv.segment_weight_list()
    return list(conv.weight.chunk(conv.groups, dim=0))


def _segmented_copy(conv: nn.Module, plan: ConvPlan, uneven: bool) -> SegmentedConv2d:
    """A ``SegmentedConv2d`` holding the entries of ``conv``'s kernel that fall inside its segments."""
    like = next(conv.parameters())
    new = SegmentedConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, plan.segments_after, bias=conv.bias is not None, uneven=uneven)
    new = new.to(device=like.device, dtype=like.dtype)
    dense = like.new_zeros(conv.out_channels, conv.in_channels, *conv.kernel_size)  # out x in x kh x kw
    with torch.no_grad():
        for (rows, cols), kernel in zip(_blocks(*conv_segment_sizes(conv)), _kernels(conv)):
            dense[rows, cols] = kernel
        for (rows, cols), kernel in zip(_blocks(new.in_sizes, new.out_sizes), new.segment_weight_list()):
            kernel.copy_(dense[rows, cols])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _separable(conv: nn.Module, plan: ConvPlan, order: str, mid_act: LayerSpec, uneven: bool) -> ContinuumConv:
    like = next(conv.parameters())
    new = ContinuumConv(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, plan.segments_after, order, mid_act, uneven=uneven, bias=conv.bias is not None)
    return new.to(device=like.device, dtype=like.dtype)


def convert(
    model: nn.Module,
    segments: Segments = "all",
    order: str | None = None,
    mid_act: LayerSpec = None,
    segment_width: int | None = None,
    uneven: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose k x k convolutions (k > 1) sit at another point of the continuum.

    The original model is untouched. Convolutions the count does not fit are left as they are and reported in a
    ``UserWarning`` (and by :func:`plan_conversion`). Moving a grouped or depthwise conv to a segment count that
    divides its groups is exact: the copy computes the same function.

    Args:
        model: any model with ``nn.Conv2d`` layers (a torchvision ResNet, a timm net, ...).
        segments: target segment count, int or ``"all"``.
        order: ``None``: each conv becomes a ``SegmentedConv2d`` with carried-over weights;
            ``"depthwise_first"`` / ``"pointwise_first"``: a ``ContinuumConv`` (spatial + 1x1), fresh weights.
        mid_act: activation between the two ops of a ``ContinuumConv`` (only with ``order``).
        segment_width: channels per segment instead of a count.
        uneven: near-equal segments where the count does not divide a layer's channels.

    Returns:
        The converted copy.
    """
    plans = plan_conversion(model, segments, order, segment_width, uneven)
    if mid_act is not None and order is None:
        raise ValueError("mid_act needs order='depthwise_first' or 'pointwise_first' (a separable unit)")
    converted = copy.deepcopy(model)
    convs = _convertible(converted)
    for plan in plans:
        conv = convs[plan.layer]
        if plan.action == "segmented":
            converted.set_submodule(plan.layer, _segmented_copy(conv, plan, uneven))
        elif plan.action == "separable":
            converted.set_submodule(plan.layer, _separable(conv, plan, parse_order(order), mid_act, uneven))
    if not plans:
        warnings.warn(f"convert found no nn.Conv2d in the {type(model).__name__}: the copy is the same model",
                      stacklevel=2)
    skipped = [f"{p.layer} ({p.reason})" for p in plans if p.action == "skipped"]
    if skipped:
        warnings.warn(f"convert left {len(skipped)} conv(s) as they are: " + "; ".join(skipped), stacklevel=2)
    return converted
