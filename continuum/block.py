"""The layers that span the Inception–separable continuum.

- :class:`SegmentedConv2d`: a drop-in for ``nn.Conv2d`` whose k x k convolution sees its channels as
  ``segments`` independent segments (1 = regular conv, ``"all"`` = depthwise), even or near-equal.
- :class:`ContinuumConv`: one separable unit, a 1x1 pointwise conv and a segmented spatial conv in either
  order, with an optional intermediate activation (and norm) between them.
- :class:`ContinuumBlock`: the Xception residual block generalised to any point of the continuum.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn.functional as F
from timm.layers import create_act_layer, get_norm_layer
from torch import nn

from continuum.kernels import ConvGeometry
from continuum.knobs import Segments, in_layer, parse_kernel_size, parse_mid_act, parse_order, \
    parse_padding, parse_pair, parse_switch, parse_whole, segment_sizes, segments_from_width
from continuum.norm import BatchNorm2d
from continuum.strategy import segmented_conv2d

LayerSpec = Union[str, Callable[..., nn.Module], None]
"""An activation or norm layer given timm-style: a name (``"relu"``), a class, or a ``functools.partial``."""


def create_norm(norm_layer: LayerSpec, channels: int) -> nn.Module:
    """Build a norm layer from a timm name (``"batchnorm2d"``), class or partial; ``None`` gives Identity. torch's
    ``nn.BatchNorm2d`` (what ``"batchnorm2d"`` names) is built as :class:`~continuum.norm.BatchNorm2d`, the same
    layer with a faster channels-last CPU training pass."""
    if norm_layer is None:
        return nn.Identity()
    try:
        layer = get_norm_layer(norm_layer)
    except (KeyError, AssertionError, ValueError):
        layer = None
    if layer is None:
        raise ValueError(f"unknown norm layer {norm_layer!r}; use a timm name such as 'batchnorm2d' or "
                         "'groupnorm', a class, or None")
    return (BatchNorm2d if layer is nn.BatchNorm2d else layer)(channels)


def create_act(act_layer: LayerSpec, inplace: bool = False) -> nn.Module:
    """Build an activation from a timm name, class or partial; ``None`` gives Identity."""
    if act_layer is None:
        return nn.Identity()
    try:
        if not isinstance(act_layer, str) and not callable(act_layer):
            raise KeyError(act_layer)
        return create_act_layer(act_layer, inplace=inplace)
    except KeyError:
        raise ValueError(f"unknown activation {act_layer!r}; use a timm name such as 'relu', 'elu', 'gelu' "
                         "or 'silu', a class, or None") from None


class SegmentedConv2d(nn.Module):
    """A k x k convolution over ``segments`` independent channel segments; a drop-in for ``nn.Conv2d``.

    With even segments the weight has ``nn.Conv2d``'s shape and key (``weight``: out x in/segments x k x k), so
    state dicts are interchangeable with a grouped ``nn.Conv2d``. With ``uneven=True`` and a count that does not
    divide the channels, each segment has its own weight ``segment_weights.i``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: spatial kernel size (int or pair).
        stride: stride (int or pair).
        padding: padding (int, pair, or ``"same"`` / ``"valid"``).
        dilation: dilation (int or pair).
        segments: int >= 1 or ``"all"``; 1 is a regular conv, ``"all"`` one segment per input channel.
        bias: add a learnable bias.
        uneven: accept a count that does not divide the channels, giving near-equal segments.
        segment_width: channels per input segment instead of a count (overrides ``segments``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        segments: Segments = 1,
        bias: bool = False,
        uneven: bool = False,
        segment_width: int | None = None,
    ) -> None:
        super().__init__()
        uneven, bias = parse_switch("uneven", uneven), parse_switch("bias", bias)
        if segment_width is not None:
            segments = segments_from_width(in_channels, segment_width)
        self.in_sizes, self.out_sizes = segment_sizes(in_channels, out_channels, segments, uneven)
        self.in_channels, self.out_channels = sum(self.in_sizes), sum(self.out_sizes)  # checked whole numbers
        self.kernel_size = parse_pair("kernel_size", kernel_size, 1)
        self.stride = parse_pair("stride", stride, 1)
        self.padding = parse_padding(padding, self.stride)
        self.dilation = parse_pair("dilation", dilation, 1)
        self.segments = len(self.in_sizes)
        self.even = len(set(self.in_sizes)) == 1 and len(set(self.out_sizes)) == 1
        self.groups = self.segments if self.even else 1
        self.geometry = ConvGeometry(self.stride, self.padding, self.dilation, self.groups)
        if self.even:
            self.weight = nn.Parameter(torch.empty(out_channels, self.in_sizes[0], *self.kernel_size))
        else:
            self.segment_weights = nn.ParameterList(
                nn.Parameter(torch.empty(o, i, *self.kernel_size)) for i, o in zip(self.in_sizes, self.out_sizes)
            )
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def segment_weight_list(self) -> list[torch.Tensor]:
        """The kernel of each segment, ``out_i x in_i x k x k``."""
        if self.even:
            return list(self.weight.chunk(self.segments, dim=0))
        return list(self.segment_weights)

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation, applied per segment (fan-in is the segment's input width)."""
        for weight in [self.weight] if self.even else self.segment_weights:
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_sizes[0] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if isinstance(x, torch.Tensor) and x.dim() == 3:  # unbatched C x H x W, taken as nn.Conv2d takes it
                return self.forward(x.unsqueeze(0)).squeeze(0)  # C_out x H' x W'
            self.check_input(x)
            if self.even:
                return segmented_conv2d(x, self.weight, self.bias, self.geometry)  # N x C_out x H' x W'
        if hasattr(self, "weight"):  # TorchScript: torch's grouped conv in place of the tuned kernels
            return self._conv(x, self.weight, self.bias, self.groups)
        else:  # uneven segments (TorchScript compiles only the branch this module has the weights for)
            parts = x.split(self.in_sizes, dim=1)  # one N x in_i x H x W tensor per segment
            biases = [] if self.bias is None else self.bias.split(self.out_sizes)
            outputs = [self._conv(parts[i], weight, biases[i] if len(biases) else None, 1)
                       for i, weight in enumerate(self.segment_weights)]
            return torch.cat(outputs, dim=1)  # N x C_out x H' x W'

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse an input that is not N x ``in_channels`` x H x W (a torch.fx Proxy passes)."""
        if not isinstance(x, torch.Tensor):
            return
        if x.dim() != 4:
            raise ValueError(f"SegmentedConv2d expects an N x C x H x W (or C x H x W) input, got shape "
                             f"{tuple(x.shape)}")
        if self.in_channels != x.shape[1]:
            raise ValueError(f"SegmentedConv2d expects {self.in_channels} input channels, got input of shape "
                             f"{tuple(x.shape)}")

    def extra_repr(self) -> str:
        sizes = "" if self.even else f", in_sizes={self.in_sizes}, out_sizes={self.out_sizes}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, segments={self.segments}{sizes}, "
                f"bias={self.bias is not None}")


class ContinuumConv(nn.Module):
    """One separable unit: a 1x1 pointwise conv and a segmented k x k spatial conv, in either order.

    ``order="depthwise_first"`` is Xception's SeparableConv (spatial on the input channels, then 1x1);
    ``order="pointwise_first"`` is the paper's "extreme Inception" module (1x1, then spatial on its outputs).
    With ``segments="all"`` and no intermediate op it is exactly timm's ``SeparableConv2d``; with
    ``segments=1`` it is a 1x1 conv next to a regular k x k conv.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: spatial kernel size.
        stride: stride of the spatial conv.
        padding: padding of the spatial conv; ``None`` keeps the size ("same" for stride 1).
        dilation: dilation of the spatial conv.
        segments: channel segments of the spatial conv, int >= 1 or ``"all"``.
        order: ``"depthwise_first"`` or ``"pointwise_first"``.
        mid_act: activation between the two ops (name, class or ``None``).
        mid_norm: norm layer between the two ops (name, class or ``None``), applied before ``mid_act``.
        depth_multiplier: spatial outputs per spatial input channel; depthwise-first: the spatial conv widens
            ``in_channels`` by it; pointwise-first: the pointwise conv gives ``out_channels / depth_multiplier``
            channels that the spatial conv widens back to ``out_channels``.
        uneven: allow segment counts that do not divide the channels (near-equal segments).
        segment_width: channels per segment instead of a count.
        bias: bias on the pointwise conv (the spatial conv has none).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str | None = None,
        dilation: int | tuple[int, int] = 1,
        segments: Segments = "all",
        order: str = "depthwise_first",
        mid_act: LayerSpec = None,
        mid_norm: LayerSpec = None,
        depth_multiplier: int = 1,
        uneven: bool = False,
        segment_width: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.order = parse_order(order)
        if isinstance(mid_act, str):
            mid_act = parse_mid_act(mid_act) if mid_act.lower() in ("", "none") else mid_act
        in_channels, out_channels = parse_whole("in_channels", in_channels), parse_whole("out_channels", out_channels)
        depth_multiplier, bias = parse_whole("depth_multiplier", depth_multiplier), parse_switch("bias", bias)
        if padding is None:
            kernel, spacing = parse_pair("kernel_size", kernel_size, 1), parse_pair("dilation", dilation, 1)
            padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, spacing))  # "same" for odd kernels
        if self.order == "depthwise_first":
            spatial_in, spatial_out = in_channels, in_channels * depth_multiplier
        else:
            if out_channels % depth_multiplier:
                raise ValueError(f"depth_multiplier={depth_multiplier} must divide out_channels={out_channels} "
                                 "with order='pointwise_first'")
            spatial_in, spatial_out = out_channels // depth_multiplier, out_channels
        with in_layer("spatial"):
            self.spatial = SegmentedConv2d(spatial_in, spatial_out, kernel_size, stride, padding, dilation,
                                           segments, uneven=uneven, segment_width=segment_width)
        if self.order == "depthwise_first":
            self.pointwise = nn.Conv2d(spatial_out, out_channels, 1, bias=bias)
        else:
            self.pointwise = nn.Conv2d(in_channels, spatial_in, 1, bias=bias)
        self.mid_norm = create_norm(mid_norm, spatial_out if self.order == "depthwise_first" else spatial_in)
        self.mid_act = create_act(mid_act, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.order == "depthwise_first":
            x = self.spatial(x)  # N x C_in*dm x H' x W'
            return self.pointwise(self.mid_act(self.mid_norm(x)))  # N x C_out x H' x W'
        x = self.pointwise(x)  # N x C_out/dm x H x W
        return self.spatial(self.mid_act(self.mid_norm(x)))  # N x C_out x H' x W'


class ContinuumBlock(nn.Module):
    """The Xception residual block at any point of the continuum.

    ``reps`` units of [act -> ContinuumConv -> norm], then a 3x3 max pool when ``stride > 1``, plus a shortcut:
    identity when shapes match, 1x1 strided conv + norm when they do not, none when ``residual=False``.
    The layout (``rep``, ``skip``, ``skipbn``) follows the reference Xception ports, so their weights map
    onto it by name.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        reps: number of separable units.
        stride: downsampling factor, applied by max pooling after the units (and by the projection shortcut).
        segments: channel segments of every spatial conv, int >= 1 or ``"all"``.
        order: ``"depthwise_first"`` or ``"pointwise_first"``.
        mid_act: activation inside each unit, between its two ops.
        residual: add the shortcut.
        start_with_act: put an activation before the first unit (Xception's first block has none).
        grow_first: change the width in the first unit (else in the last).
        act_layer: activation between units (name, class or partial).
        norm_layer: norm after each unit and on the projection shortcut.
        mid_norm: norm inside each unit, between its two ops.
        depth_multiplier: spatial outputs per spatial input channel.
        uneven: allow segment counts that do not divide the channels.
        segment_width: channels per segment instead of a count.
        kernel_size: the spatial convs' kernel (3 in Xception; 7 in ConvNeXt's depthwise convs), "same" padded.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        reps: int = 2,
        stride: int = 1,
        segments: Segments = "all",
        order: str = "depthwise_first",
        mid_act: LayerSpec = None,
        residual: bool = True,
        start_with_act: bool = True,
        grow_first: bool = True,
        act_layer: LayerSpec = "relu",
        norm_layer: LayerSpec = "batchnorm2d",
        mid_norm: LayerSpec = None,
        depth_multiplier: int = 1,
        uneven: bool = False,
        segment_width: int | None = None,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        reps = parse_whole("reps", reps)  # a block needs at least one unit
        stride = parse_whole("stride", stride)
        in_channels, out_channels = parse_whole("in_channels", in_channels), parse_whole("out_channels", out_channels)
        kernel_size = parse_kernel_size(kernel_size)
        self.residual = residual = parse_switch("residual", residual)
        if residual and (in_channels != out_channels or stride != 1):
            self.skip = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.skipbn = create_norm(norm_layer, out_channels)
        else:
            self.skip = self.skipbn = None
        layers: list[nn.Module] = []
        for i in range(reps):
            if grow_first:
                unit_in, unit_out = (in_channels if i == 0 else out_channels), out_channels
            else:
                unit_in, unit_out = in_channels, (in_channels if i < reps - 1 else out_channels)
            if start_with_act or i > 0:
                # the first activation must not overwrite the block input the shortcut still needs
                layers.append(create_act(act_layer, inplace=i > 0))
            with in_layer(f"rep.{len(layers)}"):
                layers.append(ContinuumConv(unit_in, unit_out, kernel_size, segments=segments, order=order,
                                            mid_act=mid_act,
                                            mid_norm=mid_norm, depth_multiplier=depth_multiplier, uneven=uneven,
                                            segment_width=segment_width))
            layers.append(create_norm(norm_layer, unit_out))
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride, 1))
        self.rep = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rep(x)  # N x C_out x H/stride x W/stride
        if not self.residual:
            return out
        shortcut = x if self.skip is None else self.skipbn(self.skip(x))
        return out + shortcut
