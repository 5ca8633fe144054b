"""Batch normalisation whose training pass on channels-last CPU tensors runs a C++ kernel.

torch's batch norm runs channels-last training passes at 1.7-2.0x their memory floor in float32 and 2.9-3.7x in
bfloat16 on the small images of the sweeps (64 channels at 28 px, batch 128, float32: 9.9 ms forward and backward,
this kernel 7.0 ms, the floor 5.6 ms; ``results/bench/README.md``); it was a third of a depthwise net's float32
training step. :class:`BatchNorm2d` is ``nn.BatchNorm2d`` (same arguments, state dict, running statistics and
results up to rounding) whose batch-statistics pass runs ``csrc/batch_norm.cpp``
(:func:`~continuum.compiled.batch_norm_kernels`) when the input is a channels-last CPU tensor of float32, float64 or
bfloat16 (as a conv under autocast gives it; computed in float32, with the layer's float32 weights). Everything else
(evaluation with running statistics, NCHW, other dtypes, CUDA, a machine that cannot build the kernel) and the
cases in which the conv tuner runs torch's kernels (mode ``native``, deterministic algorithms, tracing and
compiling: :func:`~continuum.strategy.use_native`) run torch's own; ``torch.jit.script`` compiles torch's module in
its place. The kernel's backward is not itself differentiable (no double backward).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from continuum.compiled import batch_norm_kernels
from continuum.strategy import use_native


class _ChannelsLastBatchNorm(torch.autograd.Function):
    """Batch norm with batch statistics on a channels-last CPU tensor: returns ``y`` (``x``'s shape), and the
    batch's mean and biased variance per channel (float64, not differentiable)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, mean, invstd, var = batch_norm_kernels().forward(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor, _grad_mean: None, _grad_var: None) -> tuple:
        x, weight, mean, invstd = ctx.saved_tensors
        wants_x, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        grad_x, grad_weight, grad_bias = batch_norm_kernels().backward(
            grad_y, x, weight, mean, invstd, wants_x, wants_weight or wants_bias)
        return (grad_x if wants_x else None, grad_weight if wants_weight else None,
                grad_bias if wants_bias else None, None)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with a C++ kernel for batch statistics on channels-last CPU tensors (see the module's
    docstring); the same arguments as ``nn.BatchNorm2d``.

    Args:
        num_features: channels ``C`` of the ``N x C x H x W`` input.
        eps: added to the variance before its square root.
        momentum: the running statistics' update factor; ``None``: a cumulative average.
        affine: learn a per-channel weight and bias.
        track_running_stats: keep running statistics (and use them in evaluation).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_statistics = self.training or self.running_mean is None
        if not (batch_statistics and self._kernel_runs(x)):
            return super().forward(x)
        y, mean, var = _ChannelsLastBatchNorm.apply(x, self.weight, self.bias, self.eps)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var, count=x.numel() // x.shape[1])
        return y

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if isinstance(input, torch.Tensor):  # torch.fx traces through this layer with a Proxy of unknown shape
            super()._check_input_dim(input)

    def __prepare_scriptable__(self) -> nn.BatchNorm2d:
        """What ``torch.jit.script`` compiles in its place: torch's ``nn.BatchNorm2d`` sharing this module's
        parameters and buffers (the C++ kernel's autograd function cannot be scripted)."""
        plain = copy.copy(self)  # a shallow copy: the same parameter and buffer dictionaries
        plain.__class__ = nn.BatchNorm2d
        return plain

    def _kernel_runs(self, x: torch.Tensor) -> bool:
        """Whether the C++ kernel computes this call (else torch's batch norm, which also raises torch's errors)."""
        return (not use_native(x) and x.dim() == 4 and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.float64, torch.bfloat16)
                and (self.weight is None or self.weight.dtype in (x.dtype, torch.float32))  # as torch allows
                and x.is_contiguous(memory_format=torch.channels_last) and x.numel() > x.shape[1] == self.num_features
                and batch_norm_kernels() is not None)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """What ``nn.BatchNorm2d`` does in training: count the batch, and move the running mean and the running
        unbiased variance towards the batch's by ``momentum`` (``None``: by 1 / batches seen)."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_((var * (count / (count - 1))).to(self.running_var.dtype), factor)
