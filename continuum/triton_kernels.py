"""A Triton kernel for depthwise and small-group convolutions on channels-last tensors, as ``torch.library`` ops.

``segmented_conv(x, weight, bias, stride, padding, dilation, groups)`` computes ``conv2d(..., groups)`` on an
``N x C x H x W`` channels-last input: each program sums a block of output pixels times a block of output channels
over the taps and the segment's input channels (unrolled: meant for 1-16 channels per segment) in float32 (fp32 or
bf16 tensors). Its backward pass reads the output gradient once and the input once per tap, and from them scatters
the input gradient and sums the kernel gradient (float32 atomics). Both are custom ops with a fake (meta)
implementation and autograd, so ``torch.compile`` treats them as opaque calls.

It runs on CUDA; with ``TRITON_INTERPRET=1`` set before this module is imported, Triton's interpreter runs it on
the CPU (slowly: for correctness tests on tiny shapes). :func:`available` says whether it can run on a device.
"""

from __future__ import annotations

import functools
import os

import torch

BLOCK_PIXELS = 32
"""Output pixels per program."""
BLOCK_CHANNELS = 32
"""Channels per program."""


tl = None  # triton.language, set when the kernels are first asked for (importing Triton is slow)


def _forward(x_ptr, w_ptr, b_ptr, y_ptr, pixels, C, C_OUT, M, H, W, OH, OW, SH, SW, PH, PW, DH, DW,
             KH: tl.constexpr, KW: tl.constexpr, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # output pixels, n * OH * OW flat
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # output channels; group c // M reads WIDTH inputs
    p_ok, c_ok = p < pixels, c < C_OUT
    n, rest = p // (OH * OW), p % (OH * OW)
    oy, ox = rest // OW, rest % OW
    first = (c // M) * WIDTH  # the group's first input channel
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            iy, ix = oy * SH - PH + i * DH, ox * SW - PW + j * DW
            ok = p_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            at = ((n * H + iy) * W + ix) * C  # BLOCK_P: the pixel's first channel, channels-last
            for k in tl.static_range(WIDTH):
                x = tl.load(x_ptr + at[:, None] + (first + k)[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
                w = tl.load(w_ptr + (c * WIDTH + k) * (KH * KW) + i * KW + j, mask=c_ok, other=0.0)
                acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + p[:, None] * C_OUT + c[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=p_ok[:, None] & c_ok[None, :])


def _backward_kernel(x_ptr, w_ptr, gy_ptr, gx_ptr, gw_ptr, pixels, C, C_OUT, M, H, W, OH, OW, SH, SW, PH, PW, DH, DW,
                     KH: tl.constexpr, KW: tl.constexpr, WIDTH: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok, c_ok = p < pixels, c < C_OUT
    n, rest = p // (OH * OW), p % (OH * OW)
    oy, ox = rest // OW, rest % OW
    first = (c // M) * WIDTH
    gy = tl.load(gy_ptr + p[:, None] * C_OUT + c[None, :], mask=p_ok[:, None] & c_ok[None, :], other=0.0)
    gy = gy.to(tl.float32)  # read once, used by every tap
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            iy, ix = oy * SH - PH + i * DH, ox * SW - PW + j * DW
            ok = p_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            at = ((n * H + iy) * W + ix) * C
            both = ok[:, None] & c_ok[None, :]
            for k in tl.static_range(WIDTH):
                where = at[:, None] + (first + k)[None, :]
                x = tl.load(x_ptr + where, mask=both, other=0.0).to(tl.float32)
                tap = (c * WIDTH + k) * (KH * KW) + i * KW + j
                w = tl.load(w_ptr + tap, mask=c_ok, other=0.0).to(tl.float32)
                tl.atomic_add(gx_ptr + where, gy * w[None, :], mask=both)
                tl.atomic_add(gw_ptr + tap, tl.sum(gy * x, axis=0), mask=c_ok)


@functools.lru_cache(maxsize=None)
def _kernels() -> tuple | None:
    """The two kernels compiled by ``triton.jit`` (for the interpreter when ``$TRITON_INTERPRET`` is 1 now), or
    ``None`` where Triton is not installed."""
    global tl
    try:
        import triton
        import triton.language
    except ImportError:
        return None
    tl = triton.language  # the kernels' source names it; the interpreter patches it in this module's globals
    return triton.jit(_forward), triton.jit(_backward_kernel)


def available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device``: Triton is installed, and the device is CUDA (or the interpreter is
    on, for tests on the CPU)."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return _kernels() is not None and (device.type == "cuda" or (interpreting and device.type == "cpu"))


def _output_size(x: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int],
                 dilation: list[int]) -> tuple[int, int]:
    return tuple((x.shape[2 + d] + 2 * padding[d] - dilation[d] * (weight.shape[2 + d] - 1) - 1) // stride[d] + 1
                 for d in range(2))


def _launch_args(x: torch.Tensor, weight: torch.Tensor, groups: int, stride: list[int], padding: list[int],
                 dilation: list[int]) -> tuple[tuple, tuple[int, int], dict]:
    """``(scalar arguments, grid, constants)`` of both kernels."""
    n, c, h, w = x.shape
    out = weight.shape[0]
    oh, ow = _output_size(x, weight, stride, padding, dilation)
    pixels = n * oh * ow
    grid = (-(-pixels // BLOCK_PIXELS), -(-out // BLOCK_CHANNELS))
    constants = {"KH": weight.shape[2], "KW": weight.shape[3], "WIDTH": c // groups, "BLOCK_P": BLOCK_PIXELS,
                 "BLOCK_C": BLOCK_CHANNELS}
    return (pixels, c, out, out // groups, h, w, oh, ow, *stride, *padding, *dilation), grid, constants


@torch.library.custom_op("continuum::segmented_conv", mutates_args=())
def segmented_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                   padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """``conv2d(x, weight, bias, stride, padding, dilation, groups)`` by the Triton kernel; channels-last out.

    Args:
        x: ``N x C x H x W``, channels-last (converted if not).
        weight: ``O x C/groups x kh x kw``; ``C/groups`` is unrolled in the kernel, so few channels per segment.
        bias: ``O`` or ``None``.
        stride: ``[sh, sw]``.
        padding: ``[ph, pw]``.
        dilation: ``[dh, dw]``.
        groups: segments.
    """
    forward, _ = _kernels()
    x = x.contiguous(memory_format=torch.channels_last)
    scalars, grid, constants = _launch_args(x, weight, groups, stride, padding, dilation)
    oh, ow = _output_size(x, weight, stride, padding, dilation)
    y = torch.empty(x.shape[0], weight.shape[0], oh, ow, device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last)
    forward[grid](x, weight.contiguous(), bias if bias is not None else weight, y, *scalars,
                  HAS_BIAS=bias is not None, **constants)
    return y


@segmented_conv.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    oh, ow = _output_size(x, weight, stride, padding, dilation)
    return x.new_empty(x.shape[0], weight.shape[0], oh, ow).contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("continuum::segmented_conv_backward", mutates_args=())
def segmented_conv_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: list[int],
                            padding: list[int], dilation: list[int], groups: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight)`` of :func:`segmented_conv`, from one read of ``grad_y`` (float32 sums)."""
    _, backward = _kernels()
    x = x.contiguous(memory_format=torch.channels_last)
    grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    scalars, grid, constants = _launch_args(x, weight, groups, stride, padding, dilation)
    grad_x = torch.zeros_like(x, dtype=torch.float32, memory_format=torch.channels_last)  # summed by atomics
    grad_w = torch.zeros_like(weight, dtype=torch.float32)
    backward[grid](x, weight.contiguous(), grad_y, grad_x, grad_w, *scalars, **constants)
    return grad_x.to(x.dtype), grad_w.to(weight.dtype)


@segmented_conv_backward.register_fake
def _(grad_y, x, weight, stride, padding, dilation, groups):
    return torch.empty_like(x, memory_format=torch.channels_last), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = stride, padding, dilation, groups
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y: torch.Tensor) -> tuple:
    x, weight = ctx.saved_tensors
    grad_x, grad_w = segmented_conv_backward(grad_y, x, weight, *ctx.geometry)
    grad_b = grad_y.sum((0, 2, 3)) if ctx.has_bias else None
    return grad_x, grad_w, grad_b, None, None, None, None


segmented_conv.register_autograd(_backward, setup_context=_setup_context)
