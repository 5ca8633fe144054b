"""A Triton kernel for depthwise convolutions on channels-last tensors, as a ``torch.library`` custom op.

``depthwise_conv(x, weight, bias, stride, padding, dilation)`` computes ``conv2d(..., groups=C)`` for a
``C x 1 x kh x kw`` weight on an ``N x C x H x W`` channels-last input: each program sums a block of output pixels
times a block of channels over the taps in float32 (fp32 or bf16 tensors). Its backward pass reads the output
gradient once and the input once per tap, and from them scatters the input gradient and sums the kernel gradient
(float32 atomics). Both are custom ops with a fake (meta) implementation and autograd, so ``torch.compile`` treats
them as opaque calls.

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


def _forward(x_ptr, w_ptr, b_ptr, y_ptr, pixels, C, H, W, OH, OW, SH, SW, PH, PW, DH, DW,
             KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr,
             BLOCK_C: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # output pixels, n * OH * OW flat
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok, c_ok = p < pixels, c < C
    n, rest = p // (OH * OW), p % (OH * OW)
    oy, ox = rest // OW, rest % OW
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            iy, ix = oy * SH - PH + i * DH, ox * SW - PW + j * DW
            ok = p_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            at = ((n * H + iy) * W + ix) * C  # BLOCK_P: the pixel's first channel, channels-last
            x = tl.load(x_ptr + at[:, None] + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
            w = tl.load(w_ptr + c * (KH * KW) + i * KW + j, mask=c_ok, other=0.0)
            acc += x.to(tl.float32) * w.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + p[:, None] * C + c[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=p_ok[:, None] & c_ok[None, :])


def _backward_kernel(x_ptr, w_ptr, gy_ptr, gx_ptr, gw_ptr, pixels, C, H, W, OH, OW, SH, SW, PH, PW, DH, DW,
                     KH: tl.constexpr, KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok, c_ok = p < pixels, c < C
    n, rest = p // (OH * OW), p % (OH * OW)
    oy, ox = rest // OW, rest % OW
    gy = tl.load(gy_ptr + p[:, None] * C + c[None, :], mask=p_ok[:, None] & c_ok[None, :], other=0.0)
    gy = gy.to(tl.float32)  # read once, used by every tap
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            iy, ix = oy * SH - PH + i * DH, ox * SW - PW + j * DW
            ok = p_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            at = ((n * H + iy) * W + ix) * C
            both = ok[:, None] & c_ok[None, :]
            x = tl.load(x_ptr + at[:, None] + c[None, :], mask=both, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c * (KH * KW) + i * KW + j, mask=c_ok, other=0.0).to(tl.float32)
            tl.atomic_add(gx_ptr + at[:, None] + c[None, :], gy * w[None, :], mask=both)
            tl.atomic_add(gw_ptr + c * (KH * KW) + i * KW + j, tl.sum(gy * x, axis=0), mask=c_ok)


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


def _launch_args(x: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int],
                 dilation: list[int]) -> tuple[tuple, tuple[int, int], int]:
    """``(scalar arguments, grid, output pixels)`` of both kernels."""
    n, c, h, w = x.shape
    oh, ow = _output_size(x, weight, stride, padding, dilation)
    pixels = n * oh * ow
    grid = (-(-pixels // BLOCK_PIXELS), -(-c // BLOCK_CHANNELS))
    return (pixels, c, h, w, oh, ow, *stride, *padding, *dilation), grid, pixels


@torch.library.custom_op("continuum::depthwise_conv", mutates_args=())
def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                   padding: list[int], dilation: list[int]) -> torch.Tensor:
    """``conv2d(x, weight, bias, stride, padding, dilation, groups=C)`` by the Triton kernel; channels-last out.

    Args:
        x: ``N x C x H x W``, channels-last (converted if not).
        weight: ``C x 1 x kh x kw``.
        bias: ``C`` or ``None``.
        stride: ``[sh, sw]``.
        padding: ``[ph, pw]``.
        dilation: ``[dh, dw]``.
    """
    forward, _ = _kernels()
    x = x.contiguous(memory_format=torch.channels_last)
    scalars, grid, _ = _launch_args(x, weight, stride, padding, dilation)
    oh, ow = scalars[4], scalars[5]
    y = torch.empty(x.shape[0], x.shape[1], oh, ow, device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last)
    forward[grid](x, weight.contiguous(), bias if bias is not None else weight, y, *scalars, KH=weight.shape[2],
                  KW=weight.shape[3], HAS_BIAS=bias is not None, BLOCK_P=BLOCK_PIXELS, BLOCK_C=BLOCK_CHANNELS)
    return y


@depthwise_conv.register_fake
def _(x, weight, bias, stride, padding, dilation):
    oh, ow = _output_size(x, weight, stride, padding, dilation)
    return x.new_empty(x.shape[0], x.shape[1], oh, ow).contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("continuum::depthwise_conv_backward", mutates_args=())
def depthwise_conv_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: list[int],
                            padding: list[int], dilation: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight)`` of :func:`depthwise_conv`, from one read of ``grad_y`` (float32 sums)."""
    _, backward = _kernels()
    x = x.contiguous(memory_format=torch.channels_last)
    grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    scalars, grid, _ = _launch_args(x, weight, stride, padding, dilation)
    grad_x = torch.zeros_like(x, dtype=torch.float32, memory_format=torch.channels_last)  # summed by atomics
    grad_w = torch.zeros_like(weight, dtype=torch.float32)
    backward[grid](x, weight.contiguous(), grad_y, grad_x, grad_w, *scalars, KH=weight.shape[2], KW=weight.shape[3],
                   BLOCK_P=BLOCK_PIXELS, BLOCK_C=BLOCK_CHANNELS)
    return grad_x.to(x.dtype), grad_w.to(weight.dtype)


@depthwise_conv_backward.register_fake
def _(grad_y, x, weight, stride, padding, dilation):
    return torch.empty_like(x, memory_format=torch.channels_last), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = stride, padding, dilation
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y: torch.Tensor) -> tuple:
    x, weight = ctx.saved_tensors
    grad_x, grad_w = depthwise_conv_backward(grad_y, x, weight, *ctx.geometry)
    grad_b = grad_y.sum((0, 2, 3)) if ctx.has_bias else None
    return grad_x, grad_w, grad_b, None, None, None


depthwise_conv.register_autograd(_backward, setup_context=_setup_context)
