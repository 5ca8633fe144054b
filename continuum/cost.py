"""What a model costs: parameters and multiply-adds from one analytic formula per layer, and measured latency.

FLOPs are reported as multiply-adds (MACs), the convention of the paper and of most model tables;
``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per multiply-add, so ``flops = 2 * macs``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from continuum.block import SegmentedConv2d
from continuum.strategy import conv_strategy
from continuum.timing import OtherLoad, call_times

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def conv_output_size(size: int, kernel: int, stride: int, padding: int | str, dilation: int) -> int:
    """Output length of a convolution along one spatial axis (``nn.Conv2d``'s formula).

    Args:
        size: input length.
        kernel: kernel length.
        stride: stride.
        padding: padding per side, or ``"same"`` / ``"valid"``.
        dilation: dilation.
    """
    if padding == "same":
        return size
    pad = 0 if padding == "valid" else padding
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def conv_segment_sizes(conv: nn.Conv2d | SegmentedConv2d) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Input and output channels of each segment (group) of a convolution."""
    if isinstance(conv, SegmentedConv2d):
        return conv.in_sizes, conv.out_sizes
    g = conv.groups
    return (conv.in_channels // g,) * g, (conv.out_channels // g,) * g


def conv_cost(conv: nn.Conv2d | SegmentedConv2d, in_hw: tuple[int, int]) -> tuple[int, int]:
    """Parameters and multiply-adds of one image through a (segmented) 2-d convolution.

    params = sum_i out_i * in_i * kh * kw (+ out for a bias); macs = that kernel volume * H_out * W_out.

    Args:
        conv: the convolution.
        in_hw: input height and width.
    """
    kh, kw = conv.kernel_size
    padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    pads = (padding, padding) if isinstance(padding, str) else padding
    out_h, out_w = (conv_output_size(s, k, st, p, d)
                    for s, k, st, p, d in zip(in_hw, (kh, kw), conv.stride, pads, conv.dilation))
    in_sizes, out_sizes = conv_segment_sizes(conv)
    kernel_params = sum(i * o for i, o in zip(in_sizes, out_sizes)) * kh * kw
    params = kernel_params + (conv.out_channels if conv.bias is not None else 0)
    return params, kernel_params * out_h * out_w


def layer_cost(module: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, int]:
    """Parameters and multiply-adds of one image through a leaf layer, from its analytic formula.

    Convolutions and linear layers have MACs; norms have ``2 * C`` affine parameters and no MACs; any other
    layer holding parameters counts them as stored, with no MACs.

    Args:
        module: a leaf layer.
        in_shape: shape of its input for one image (without the batch axis).
    """
    if isinstance(module, (nn.Conv2d, SegmentedConv2d)):
        return conv_cost(module, in_shape[-2:])
    if isinstance(module, nn.Linear):
        positions = 1
        for dim in in_shape[:-1]:
            positions *= dim
        params = module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
        return params, module.in_features * module.out_features * positions
    if isinstance(module, _NORMS):
        affine = getattr(module, "affine", None) or getattr(module, "elementwise_affine", False)
        channels = getattr(module, "num_features", None) or getattr(module, "num_channels", None)
        if channels is None:
            channels = 1
            for dim in module.normalized_shape:
                channels *= dim
        return (2 * channels if affine else 0), 0
    return sum(p.numel() for p in module.parameters(recurse=False)), 0


def costed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers that carry cost: every ``SegmentedConv2d`` whole, and every other module without children
    that holds parameters (parameter-free layers such as activations and pools are counted as no MACs)."""
    layers: dict[str, nn.Module] = {}
    inside: str | None = None  # name prefix of the sublayers of the last SegmentedConv2d
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(module, SegmentedConv2d):
            layers[name] = module
            inside = f"{name}." if name else ""
        elif not any(True for _ in module.children()) and any(True for _ in module.parameters(recurse=False)):
            layers[name] = module
    return layers


@dataclass(frozen=True)
class Cost:
    """Parameters and multiply-adds of a model for one image.

    Args:
        params: trainable and frozen parameters.
        macs: multiply-adds of one forward pass of one image.
    """

    params: int
    macs: int

    @property
    def flops(self) -> int:
        """FLOPs as ``FlopCounterMode`` counts them (2 per multiply-add)."""
        return 2 * self.macs


def layer_costs(model: nn.Module, input_size: tuple[int, int, int]) -> pd.DataFrame:
    """One row per leaf layer: name, type, input/output shape, parameters and multiply-adds.

    The model runs once on a zero batch of one image to learn each layer's input shape; a layer called
    several times gets its MACs summed and its parameters counted once.

    Args:
        model: any ``nn.Module`` taking an ``N x C x H x W`` tensor.
        input_size: ``(C, H, W)`` of one image.
    """
    rows: dict[str, dict] = {}
    hooks = []

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            in_shape = tuple(inputs[0].shape[1:])
            params, macs = layer_cost(module, in_shape)
            row = rows.setdefault(name, {"layer": name, "type": type(module).__name__, "in_shape": in_shape,
                                         "out_shape": tuple(output.shape[1:]), "params": params, "macs": 0})
            row["macs"] += macs
        return hook

    layers = costed_layers(model)
    for name, module in layers.items():
        hooks.append(module.register_forward_hook(record(name)))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), conv_strategy("native"):  # the shapes are the same: nothing to tune for one image
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()
    frame = pd.DataFrame(list(rows.values()), columns=["layer", "type", "in_shape", "out_shape", "params", "macs"])
    unused = sum(p.numel() for n, m in layers.items() if n not in rows for p in m.parameters())
    if unused:
        frame.loc[len(frame)] = ["(not called in forward)", "", (), (), unused, 0]
    return frame


def model_cost(model: nn.Module, input_size: tuple[int, int, int]) -> Cost:
    """Total parameters and multiply-adds of one image, summed over :func:`layer_costs`.

    Args:
        model: any ``nn.Module`` taking an ``N x C x H x W`` tensor.
        input_size: ``(C, H, W)`` of one image.
    """
    frame = layer_costs(model, input_size)
    return Cost(params=int(frame["params"].sum()), macs=int(frame["macs"].sum()))


def counted_flops(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """FLOPs of one image as ``torch.utils.flop_counter.FlopCounterMode`` measures them (2 per MAC).

    Segmented convs run natively here: the count is the model's arithmetic, not that of the strategy that
    happens to be fastest on this machine (which may multiply by zeros).
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), conv_strategy("native"), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def saved_bytes_per_image(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Bytes that one training image's forward pass keeps for the backward pass (the activations autograd saves),
    in the model's dtype; on a meta-device model (``with torch.device("meta")``) nothing is computed or allocated.

    Tensors whose size does not grow with the batch (weights) are left out: the count is the growth from a batch of
    two images to three. Temporary buffers come on top, so it is a lower bound of a step's memory beyond the weights.

    Args:
        model: any ``nn.Module`` taking an ``N x C x H x W`` tensor; put in training mode while it runs.
        input_size: ``(C, H, W)`` of one image.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.train()

    def saved_bytes(batch: int) -> int:
        saved: dict[int, torch.Tensor] = {}  # by identity: a tensor saved by two operations counts once

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            saved[id(tensor)] = tensor
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), conv_strategy("native"):
            model(torch.zeros(batch, *input_size, device=device))
        return sum(t.numel() * t.element_size() for t in saved.values())
    try:
        return saved_bytes(3) - saved_bytes(2)
    finally:
        model.train(was_training)


CONTENDED_LOAD = 0.1
"""A latency measured while other processes used more than this share of the machine's CPU time is contended:
recorded, but marked as not to be trusted."""


@dataclass(frozen=True)
class Latency:
    """Wall time of one call, over repeated runs after warm-up.

    Args:
        median_ms: median milliseconds per call.
        q1_ms: first quartile.
        q3_ms: third quartile.
        repeats: timed calls.
        device: where it ran.
        other_load: share of the machine's CPU time other processes used meanwhile (``None``: unknown).
    """

    median_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int
    device: str
    other_load: float | None = None

    @property
    def contended(self) -> bool:
        """Other processes kept the machine busy while it was measured (see :data:`CONTENDED_LOAD`)."""
        return self.other_load is not None and self.other_load > CONTENDED_LOAD


def measure_latency(
    model: nn.Module,
    input_size: tuple[int, int, int],
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    warmup: int = 3,
    repeats: int = 10,
    backward: bool = False,
) -> Latency:
    """Time a model's forward (or forward + backward) pass: warm-up, then the median of timed repeats.

    On CUDA the device is synchronised around every timed call, so the time is the kernels' and not the
    launch's. The model is put in eval mode for a forward-only probe and restored afterwards.

    Args:
        model: the model; it is moved to ``device``.
        input_size: ``(C, H, W)`` of one image.
        batch_size: images per call.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        warmup: untimed calls first (allocator, cuDNN autotuning, caches).
        repeats: timed calls; at least 1.
        backward: time forward + backward of the summed output, in train mode, instead of inference.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} is not valid; time at least one call")
    device = torch.device(device)
    model = model.to(device)
    x = torch.randn(batch_size, *input_size, device=device, generator=torch.Generator(device).manual_seed(0))
    was_training = model.training
    model.train(backward)

    def call() -> None:
        if backward:
            model.zero_grad(set_to_none=True)
            model(x).float().sum().backward()
        else:
            with torch.inference_mode():
                model(x)

    try:
        with OtherLoad() as load:
            times = call_times(call, device, repeats, warmup)
    finally:
        model.train(was_training)
    q1, median, q3 = statistics.quantiles(times, n=4) if repeats > 1 else (times[0],) * 3
    return Latency(median_ms=median, q1_ms=q1, q3_ms=q3, repeats=repeats, device=str(device),
                   other_load=load.share)
