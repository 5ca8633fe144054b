"""Equivalent ways of computing a segmented convolution (the tuner in :mod:`continuum.strategy` picks one).

A convolution with ``G`` even segments (``groups=G``) can be computed many ways that give the same numbers up to
float rounding:

- ``grouped/g``: a native grouped ``conv2d`` with ``g`` groups, ``g`` any divisor of ``G``. ``g = G`` is the plain
  grouped conv; ``g < G`` embeds the kernels block-diagonally into fewer, larger groups (``g = 1``: a dense conv
  with zeros off the diagonal). More FLOPs, but dense kernels are often much faster than grouped ones.
- ``grouped/g+cl``: the same in channels-last memory format (converted back afterwards).
- ``unfold``: im2col (``F.unfold``) and one batched matrix product per segment.
- ``shifted``: depthwise only (one input and one output channel per segment): the sum of ``k*k`` shifted copies
  of the input, each scaled per channel.
- ``fused``: depthwise only, on the CPU in float32/float64: a C++ backward pass (:mod:`continuum.compiled`) that
  computes the input and kernel gradients in one sweep over the output gradient instead of two, and torch's
  channels-last forward pass (3 x 3, stride 1, "same" padding in float32 on an AVX-512 CPU: both passes in C++, 16
  channels and two output rows (the forward pass: six) at a time, in bands of rows fetched into L2 while the band
  before runs, the kernel gradient summed in registers, outputs written with streaming stores). A candidate only
  where the C++ kernel could be built.
- ``rotated``: 2 to 7 input and output channels per segment, stride 1, on a CPU with AVX-512 or AVX2, in float32
  (and float64): a C++ kernel (:mod:`continuum.compiled`) that treats a segment's channels as rotations of one
  loaded row of channels-last pixels, so that the work is K depthwise multiply-adds on data read once; the input
  gradient is the same kernel run over the output gradient, the kernel gradient a second kernel that sums in
  registers, a band of rows at a time; each pass fetches the rows it reads next into L2 while it runs. A candidate
  only where the C++ kernel could be built.
- ``broadcast``: 8 to 16 input and output channels per segment, stride 1, on a CPU with AVX-512 or AVX2, in
  float32 (and float64): the same C++ module's second kernel, one segment per vector register (two with AVX2 past 8
  channels), its output channels in the lanes, each input channel's value broadcast to them; the gradients as
  ``rotated`` computes them, the kernel gradient at 8 and 12 channels per segment (12 with AVX2) with two segments
  packed into a register where the channels allow, so that no lane idles.
- ``triton``: 1-16 channels per segment, on CUDA: a Triton kernel (:mod:`continuum.triton_kernels`), forward and a
  backward that reads the output gradient once for both gradients. A candidate only on CUDA with Triton installed,
  and, like every candidate, chosen only when it wins the timing there.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from continuum import triton_kernels
from continuum.compiled import BROADCAST_WIDTHS, FEW_CHANNEL_WIDTHS, depthwise_kernels, few_channel_kernels


class ConvGeometry(NamedTuple):
    """Everything about a convolution call except its tensors (a named tuple: hashing it is cheap, and every
    call looks its strategy up by it).

    Args:
        stride: ``(sh, sw)``.
        padding: ``(ph, pw)`` or ``"same"`` / ``"valid"``.
        dilation: ``(dh, dw)``.
        groups: segments of the convolution.
    """

    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int

    def numeric_padding(self, kernel: tuple[int, int]) -> tuple[int, int] | None:
        """Padding as numbers, or ``None`` where ``"same"`` would need uneven padding."""
        if self.padding == "valid":
            return 0, 0
        if self.padding != "same":
            return self.padding  # type: ignore[return-value]
        total = [d * (k - 1) for d, k in zip(self.dilation, kernel)]
        if self.stride != (1, 1) or any(t % 2 for t in total):
            return None
        return total[0] // 2, total[1] // 2


@dataclass(frozen=True)
class Strategy:
    """One way of computing a segmented convolution.

    Args:
        kind: ``"grouped"``, ``"unfold"``, ``"shifted"``, ``"fused"``, ``"rotated"``, ``"broadcast"`` or
            ``"triton"``.
        groups: the groups a ``grouped`` strategy runs with (a divisor of the segments).
        channels_last: compute in channels-last memory format.
    """

    kind: str
    groups: int = 0
    channels_last: bool = False

    @property
    def name(self) -> str:
        """``grouped/4``, ``grouped/4+cl``, ``unfold``, ``shifted``, ``fused``, ``rotated``, ``broadcast`` or
        ``triton``."""
        base = f"grouped/{self.groups}" if self.kind == "grouped" else self.kind
        return base + ("+cl" if self.channels_last else "")

    @classmethod
    def parse(cls, name: str) -> Strategy:
        """The strategy called ``name`` (see :attr:`name`)."""
        base, _, suffix = name.partition("+")
        kind, _, groups = base.partition("/")
        return cls(kind, int(groups) if groups else 0, suffix == "cl")


def is_channels_last(x: torch.Tensor) -> bool:
    """Stored channels-last (and not also plain contiguous, as 1x1 images or single channels are)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def block_diagonal(weight: torch.Tensor, groups: int, new_groups: int, channels_last: bool = False) -> torch.Tensor:
    """The kernels of a ``groups``-group conv as a ``new_groups``-group conv (zeros between segments).

    Copies the kernels into the diagonal of a zero tensor, built in the memory format it is used in: about a
    third of what a product with an identity matrix plus a format conversion cost (0.2 ms of a 5 ms conv).

    Args:
        weight: ``out x in/groups x kh x kw``.
        groups: groups of ``weight``.
        new_groups: a divisor of ``groups``.
        channels_last: return it in channels-last memory format.

    Returns:
        ``out x in/new_groups x kh x kw``.
    """
    if new_groups == groups:
        return weight
    out, width, kh, kw = weight.shape
    merged = groups // new_groups  # old groups per new group
    blocks = weight.view(new_groups, merged, out // groups, width, kh, kw)  # splitting a dim is always a view
    dense = torch.empty(out, merged * width, kh, kw, dtype=weight.dtype, device=weight.device,
                        memory_format=torch.channels_last if channels_last else torch.contiguous_format).zero_()
    diagonal = dense.view(new_groups, merged, out // groups, merged, width, kh, kw).diagonal(dim1=1, dim2=3)
    diagonal.copy_(blocks.movedim(1, -1))  # new_groups x out_i x width x kh x kw x merged
    return dense


def _output_size(x: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, padding: tuple[int, int]
                 ) -> tuple[int, int]:
    """``(H', W')`` of the convolution's output, for numeric ``padding``."""
    return tuple((x.shape[2 + i] + 2 * padding[i] - geom.dilation[i] * (weight.shape[2 + i] - 1) - 1)
                 // geom.stride[i] + 1 for i in range(2))


def _unfold_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: ConvGeometry,
                 padding: tuple[int, int]) -> torch.Tensor:
    n = x.shape[0]
    out, width, kh, kw = weight.shape
    oh, ow = _output_size(x, weight, geom, padding)
    cols = F.unfold(x, (kh, kw), geom.dilation, padding, geom.stride)  # N x (C*kh*kw) x L
    cols = cols.view(n, geom.groups, width * kh * kw, oh * ow)  # N x G x (C/G*kh*kw) x L
    kernels = weight.reshape(geom.groups, out // geom.groups, width * kh * kw)  # G x O/G x (C/G*kh*kw)
    y = torch.matmul(kernels, cols).reshape(n, out, oh, ow)  # N x G x O/G x L -> N x O x H' x W'
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def _shifted_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: ConvGeometry,
                  padding: tuple[int, int]) -> torch.Tensor:
    channels = x.shape[1]
    kh, kw = weight.shape[2:]
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    oh, ow = _output_size(x, weight, geom, padding)
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))  # N x C x (H+2ph) x (W+2pw)
    y = None
    for i in range(kh):
        for j in range(kw):
            patch = padded[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]
            scale = weight[:, 0, i, j].view(1, channels, 1, 1)
            y = patch * scale if y is None else torch.addcmul(y, patch, scale)  # N x C x H' x W'
    return y if bias is None else y + bias.view(1, -1, 1, 1)


class _FusedDepthwise(torch.autograd.Function):
    """A channels-last depthwise conv: the C++ forward pass (torch's conv2d outside its register-blocked 3 x 3 path),
    the C++ one-sweep backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.geometry = list(stride), list(padding), list(dilation)
        return depthwise_kernels().forward(x, weight, bias, *ctx.geometry)  # N x C x H' x W', channels-last

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        grad_x, grad_w = depthwise_kernels().backward(grad_y, x, weight, *ctx.geometry)
        grad_b = grad_y.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None


@functools.lru_cache(maxsize=None)
def _rotation_index(channels: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, columns)``, each ``K x C``: where :func:`rotations` takes each tap from and
    :func:`rotated_weight_gradient` puts its gradient back (built once per shape, not on every call)."""
    channel = torch.arange(channels, device=device)
    position = channel % k  # within the group
    rows = channel - position + (position + torch.arange(k, device=device).view(k, 1)) % k  # K x C
    return rows, position.expand(k, -1)


def rotations(weight: torch.Tensor) -> torch.Tensor:
    """A ``C x K x kh x kw`` grouped kernel (``K`` channels per group, in and out) as the ``rotated`` kernel reads it:
    ``kh x kw x K x C``, ``taps[i, j, e, c] = weight[base(c) + (c % K + e) % K, c % K, i, j]``, the entry from input
    channel ``c`` to the output channel ``e`` places further round its group."""
    rows, columns = _rotation_index(*weight.shape[:2], weight.device)
    return weight[rows, columns].permute(2, 3, 0, 1).contiguous()  # K x C x kh x kw -> kh x kw x K x C


def group_blocks(weight: torch.Tensor) -> torch.Tensor:
    """A grouped kernel (``C x K x kh x kw``, ``K`` channels per group in and out) as its groups' blocks:
    ``G x K out x K in x kh x kw`` (a view)."""
    channels, k = weight.shape[:2]
    return weight.view(channels // k, k, k, *weight.shape[2:])


def broadcast_taps(weight: torch.Tensor) -> torch.Tensor:
    """A ``C x K x kh x kw`` grouped kernel (``K`` channels per group, in and out) as the ``broadcast`` kernel reads
    it: ``kh x kw x C x K``, ``taps[i, j, c, e] = weight[base(c) + e, c % K, i, j]``, the ``K`` output channels input
    channel ``c`` feeds."""
    channels, k, kh, kw = weight.shape
    taps = group_blocks(weight).permute(3, 4, 0, 2, 1)  # kh x kw x G x K in x K out
    return taps.reshape(kh, kw, channels, k).contiguous()


def broadcast_weight_gradient(grad_taps: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of ``weight`` from the gradient of its :func:`broadcast_taps` (``kh x kw x C x K``)."""
    channels, k, kh, kw = weight.shape
    blocks = grad_taps.view(kh, kw, channels // k, k, k)  # kh x kw x G x K in x K out
    return blocks.permute(2, 4, 3, 0, 1).reshape(weight.shape)  # G x K out x K in x kh x kw


def rotated_weight_gradient(grad_taps: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of ``weight`` from the gradient of its :func:`rotations` (``kh x kw x K x C``)."""
    rows, columns = _rotation_index(*weight.shape[:2], weight.device)
    grad_w = grad_taps.new_empty(weight.shape)
    grad_w[rows, columns] = grad_taps.permute(2, 3, 0, 1)  # each entry once: (rows, columns) covers weight
    return grad_w


def flipped_transpose(weight: torch.Tensor) -> torch.Tensor:
    """The kernel whose stride-1 convolution of the output gradient is the input gradient of a grouped conv
    (``C x K x kh x kw``, ``K`` channels per group in and out): each group's ``K x K`` block transposed, each
    kernel turned by 180 degrees."""
    return group_blocks(weight).transpose(1, 2).flip(3, 4).reshape(weight.shape)


class FewChannelKernel(NamedTuple):
    """One of ``few_channel.cpp``'s kernels: the names of its functions in the built module and how it reads a
    grouped conv's weight.

    Args:
        forward: ``forward(x, taps, stride, padding, dilation)``.
        taps_gradient: ``taps_gradient(grad_y, x, kh, kw, k, stride, padding, dilation)``.
        taps: the weight (``C x K x kh x kw``) laid out as the kernel reads it.
        weight_gradient: ``weight_gradient(grad_taps, weight)``, the weight's gradient from its taps' gradient.
    """

    forward: str
    taps_gradient: str
    taps: Callable[[torch.Tensor], torch.Tensor]
    weight_gradient: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


FEW_CHANNEL_KERNELS = {
    "rotated": FewChannelKernel("forward", "taps_gradient", rotations, rotated_weight_gradient),
    "broadcast": FewChannelKernel("broadcast_forward", "broadcast_taps_gradient", broadcast_taps,
                                  broadcast_weight_gradient),
}
"""The strategies ``few_channel.cpp`` computes, by name."""


class _FewChannelGrouped(torch.autograd.Function):
    """A channels-last grouped conv of a few channels per group, stride 1, by one of :data:`FEW_CHANNEL_KERNELS`: the
    C++ kernel computes the forward pass, the input gradient (a forward pass over the output gradient) and the kernel
    gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int], kernel: FewChannelKernel) -> torch.Tensor:
        if not rotated_geometry(weight.shape[2:], stride, padding, dilation):
            raise ValueError("strategies rotated and broadcast run stride 1, with padding at most dilation * "
                             "(kernel size - 1)")
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.kernel = (list(stride), list(padding), list(dilation)), kernel
        forward = getattr(few_channel_kernels(), kernel.forward)
        y = forward(x, kernel.taps(weight), *ctx.geometry)  # N x C x H' x W', channels-last
        return y if bias is None else y + bias.view(1, -1, 1, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        kernel, module, (_, k, kh, kw) = ctx.kernel, few_channel_kernels(), weight.shape
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # stride 1: each output pixel's gradient reaches the inputs its kernel read
            grad_x = getattr(module, kernel.forward)(grad_y, kernel.taps(flipped_transpose(weight)), [1, 1],
                                                     gradient_padding((kh, kw), padding, dilation), dilation)
        if ctx.needs_input_grad[1]:
            grad_taps = getattr(module, kernel.taps_gradient)(grad_y, x, kh, kw, k, *ctx.geometry)
            grad_w = kernel.weight_gradient(grad_taps, weight)
        grad_b = grad_y.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None


def gradient_padding(kernel: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> list[int]:
    """The padding of the stride-1 forward pass over the output gradient that gives the input gradient: the
    kernel's reach ``dilation * (size - 1)`` less the forward padding (negative where the padding is wider)."""
    return [d * (size - 1) - p for size, p, d in zip(kernel, padding, dilation)]


def rotated_geometry(kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                     dilation: tuple[int, int]) -> bool:
    """Whether the ``rotated`` kernel computes this geometry (numeric ``padding``): stride 1, and padding no wider
    than the kernel's reach (its input gradient is a forward pass with ``gradient_padding``)."""
    return tuple(stride) == (1, 1) and min(gradient_padding(kernel, padding, dilation)) >= 0


def _cpp_strategy(kernel: type[torch.autograd.Function], name: str, *extra: object) -> Callable[..., torch.Tensor]:
    """The strategy ``name``: ``kernel`` (a C++ kernel's autograd function of channels-last float32 or float64 CPU
    tensors: ``apply(x, weight, bias, stride, padding, dilation, *extra)``) on the call's tensors."""
    def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: ConvGeometry,
             padding: tuple[int, int]) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled("cpu"):
            raise ValueError(f"strategy {name} runs float32 or float64 on the CPU, without autocast")
        x = x.contiguous(memory_format=torch.channels_last)
        return kernel.apply(x, weight, bias, geom.stride, padding, geom.dilation, *extra)
    return conv


def _triton_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: ConvGeometry,
                 padding: tuple[int, int]) -> torch.Tensor:
    if not triton_kernels.available(x.device):
        raise ValueError("strategy triton runs on CUDA, with Triton installed")
    return triton_kernels.segmented_conv(x, weight, bias, list(geom.stride), list(padding), list(geom.dilation),
                                         geom.groups)


_COMPUTED_BY = {"unfold": _unfold_conv, "shifted": _shifted_conv, "fused": _cpp_strategy(_FusedDepthwise, "fused"),
                "triton": _triton_conv, **{name: _cpp_strategy(_FewChannelGrouped, name, kernel)
                                           for name, kernel in FEW_CHANNEL_KERNELS.items()}}
"""The function computing each strategy other than ``grouped``, given numeric padding."""


def output_pixels(x: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry) -> int:
    if geom.padding == "same":
        return x.shape[2] * x.shape[3]
    return math.prod(_output_size(x, weight, geom, geom.numeric_padding((1, 1))))


def run_strategy(strategy: Strategy, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 geom: ConvGeometry) -> torch.Tensor:
    """Compute ``conv2d(x, weight, bias, groups=geom.groups, ...)`` with ``strategy``.

    Args:
        strategy: one of :func:`candidates`.
        x: ``N x C x H x W``.
        weight: ``O x C/groups x kh x kw``.
        bias: ``O`` or ``None``.
        geom: stride, padding, dilation and groups.

    Returns:
        ``N x O x H' x W'`` in ``x``'s memory format.
    """
    channels_last_input = is_channels_last(x)
    if strategy.kind == "grouped":
        kernels = block_diagonal(weight, geom.groups, strategy.groups, strategy.channels_last)
        if strategy.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            kernels = kernels.contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x, kernels, bias, geom.stride, geom.padding, geom.dilation, strategy.groups)
    else:
        padding = geom.numeric_padding(tuple(weight.shape[2:]))
        if padding is None:
            raise ValueError(f"strategy {strategy.name} cannot do padding={geom.padding!r} with stride {geom.stride}")
        y = _COMPUTED_BY[strategy.kind](x, weight, bias, geom, padding)
    return y.contiguous(memory_format=torch.channels_last if channels_last_input else torch.contiguous_format)


def candidates(in_channels: int, out_channels: int, kernel: tuple[int, int], geom: ConvGeometry,
               device_type: str = "cpu") -> list[Strategy]:
    """Every strategy that can compute this convolution on this kind of device, fewest FLOPs first.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel: ``(kh, kw)``.
        geom: stride, padding, dilation and groups.
        device_type: ``"cpu"`` or ``"cuda"`` (``fused`` runs on the one, ``triton`` on the other).
    """
    divisors = [g for g in range(geom.groups, 0, -1) if geom.groups % g == 0]
    found = [Strategy("grouped", g, cl) for g in divisors for cl in (False, True)]
    padding = geom.numeric_padding(kernel)
    if padding is not None:
        if geom.groups > 1:
            found.insert(2, Strategy("unfold"))
        if geom.groups == in_channels == out_channels:
            found.insert(2, Strategy("shifted"))
            if device_type == "cpu" and depthwise_kernels() is not None:
                found.insert(2, Strategy("fused"))
        width = in_channels // geom.groups  # channels per segment
        if (device_type == "cpu" and in_channels == out_channels
                and (width in FEW_CHANNEL_WIDTHS or width in BROADCAST_WIDTHS)
                and rotated_geometry(kernel, geom.stride, padding, geom.dilation)
                and few_channel_kernels() is not None):
            found.insert(2, Strategy("rotated" if width in FEW_CHANNEL_WIDTHS else "broadcast"))
        few = width <= 16  # unrolled in the Triton kernel
        if few and device_type == "cuda" and triton_kernels.available(torch.device("cuda")):
            found.insert(2, Strategy("triton"))

    return found


def strategy_flops(strategy: Strategy, geom: ConvGeometry, forward_flops: float) -> float:
    """FLOPs a strategy performs, given the segmented conv's own ``forward_flops``."""
    return forward_flops * (geom.groups / strategy.groups if strategy.kind == "grouped" else 1)
