"""``python -m continuum.bench``: is a segmented convolution as fast as it can be, at every segment count?

For each shape and segment count it times forward + backward of :class:`~continuum.block.SegmentedConv2d` and
:class:`~continuum.block.ContinuumConv` (autotuned strategy, on NCHW and on channels-last input, the faster kept)
against the native ``nn.Conv2d`` in NCHW and in channels-last (and timm's ``SeparableConv2d`` where it applies),
and puts each time beside the roofline floor:
``max(FLOPs / peak GEMM FLOP/s, bytes / copy bandwidth)``, both measured on the device first. ``--train`` adds the
training throughput of a sweep trial (images/s, model FLOP utilisation) with native kernels and with autotuned ones.

    python -m continuum.bench                                 # CPU, fp32, every shape; results/bench/conv_cpu.csv
    python -m continuum.bench --device cuda --dtypes fp32,bf16 --train

Prints one table per section and writes CSVs named after the device under ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import timm
import torch
from timm.layers import SeparableConv2d
from torch import nn

import continuum  # noqa: F401  (registers the models)
from continuum.block import ContinuumConv, SegmentedConv2d
from continuum.config import TrainConfig
from continuum.cost import model_cost
from continuum.data import make_synthetic
from continuum.strategy import chosen_strategy, conv_strategy, device_name, measure_peak_flops, time_call
from continuum.train import fit, resolve_device


@dataclass(frozen=True)
class Shape:
    """A benchmarked layer input: ``batch x channels x size x size``, 3x3 kernel, stride 1, same padding.

    Args:
        name: label in the tables.
        channels: input and output channels.
        size: height and width.
        batch: images per call.
    """

    name: str
    channels: int
    size: int
    batch: int


SHAPES = {s.name: s for s in (
    Shape("xception_middle", 728, 19, 32),  # Xception's middle flow at 299 px
    Shape("small_64", 64, 28, 128),  # continuum_small's first stage on Fashion-MNIST
    Shape("small_128", 128, 32, 32),
    Shape("small_256", 256, 14, 32),
    Shape("tiny", 16, 8, 4),  # a smoke test
)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def segment_counts(channels: int) -> list[int]:
    """1, 2, 4, ... (powers of two that divide ``channels``), then ``channels`` divided by them, up to all."""
    powers = [2 ** i for i in range(channels.bit_length()) if channels % 2 ** i == 0]
    return sorted(set(powers) | {channels // p for p in powers})


def measure_copy_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """Bytes/s of a large tensor copy (read + write) on ``device``: the best of 3."""
    src = torch.empty(megabytes * 2 ** 18, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best_ms = min(time_call(lambda: dst.copy_(src), device, repeats=1, warmup=0) for _ in range(3))
    return 2 * src.numel() * src.element_size() / (best_ms / 1e3)


def fwd_bwd(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A call running ``layer`` forward and backward on ``x`` (gradients accumulate; the timing does not care)."""
    upstream = torch.ones_like(layer(x))

    def call() -> None:
        layer(x).backward(upstream)

    return call


def _native_conv(shape: Shape, segments: int, dtype: torch.dtype, device: torch.device) -> nn.Conv2d:
    return nn.Conv2d(shape.channels, shape.channels, 3, padding=1, groups=segments, bias=False).to(device, dtype)


def _rows_for(shape: Shape, segments: int, dtype: torch.dtype, device: torch.device, peak: float, bandwidth: float,
              repeats: int) -> list[dict]:
    c, elem = shape.channels, torch.finfo(dtype).bits // 8
    x = torch.randn(shape.batch, c, shape.size, shape.size, device=device, dtype=dtype, requires_grad=True)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    pixels = shape.batch * shape.size * shape.size
    label = "all" if segments == c else str(segments)
    common = {"shape": shape.name, "channels": c, "size": shape.size, "batch": shape.batch,
              "dtype": str(dtype).removeprefix("torch."), "segments": label, "device": device_name(device)}

    def timed(call: Callable[[], None]) -> float:
        return time_call(call, device, repeats=repeats, warmup=1)

    rows = []
    inputs = {"nchw": x, "cl": x_cl}
    # --- SegmentedConv2d: the 3x3 conv alone
    ours = SegmentedConv2d(c, c, 3, padding=1, segments=segments).to(device, dtype)
    native = _native_conv(shape, segments, dtype, device)
    native_cl = _native_conv(shape, segments, dtype, device).to(memory_format=torch.channels_last)
    weights = c * c // segments * 9
    rows.append(_row(common, "SegmentedConv2d", ours, inputs, timed, {
        "native_nchw_ms": timed(fwd_bwd(native, x)), "native_cl_ms": timed(fwd_bwd(native_cl, x_cl))},
        flops=3 * 2 * pixels * weights, tensor_bytes=3 * elem * (2 * x.numel() + weights), peak=peak,
        bandwidth=bandwidth, spatial=ours))
    # --- ContinuumConv: depthwise-first separable unit (spatial conv + 1x1 conv)
    unit = ContinuumConv(c, c, 3, segments=segments).to(device, dtype)
    with conv_strategy("native"):
        alternatives = {"native_nchw_ms": timed(fwd_bwd(unit, x))}
        unit_cl = ContinuumConv(c, c, 3, segments=segments).to(device, dtype, memory_format=torch.channels_last)
        alternatives["native_cl_ms"] = timed(fwd_bwd(unit_cl, x_cl))
    if segments == c:
        alternatives["timm_separable_ms"] = timed(fwd_bwd(SeparableConv2d(c, c, 3).to(device, dtype), x))
    weights += c * c
    rows.append(_row(common, "ContinuumConv", unit, inputs, timed, alternatives, flops=3 * 2 * pixels * weights,
                     tensor_bytes=3 * elem * (3 * x.numel() + weights), peak=peak, bandwidth=bandwidth,
                     spatial=unit.spatial))
    return rows


def _row(common: dict, layer_name: str, layer: nn.Module, inputs: dict[str, torch.Tensor], timed: Callable,
         alternatives: dict, flops: float, tensor_bytes: float, peak: float, bandwidth: float,
         spatial: SegmentedConv2d) -> dict:
    """One table row: ``layer`` (autotuned) timed on NCHW and on channels-last input, the faster kept, beside the
    native ``alternatives`` and the roofline floor."""
    ours, strategies = {}, {}
    with conv_strategy("auto"):
        for layout, x in inputs.items():
            ours[layout] = timed(fwd_bwd(layer, x))  # the first call autotunes
            # a depthwise-first unit's spatial conv sees x itself
            strategies[layout] = chosen_strategy(x, spatial.weight, None, spatial.geometry).name
    layout = min(ours, key=ours.get)
    fastest_native = min(alternatives.values())
    floor_ms = max(flops / peak, tensor_bytes / bandwidth) * 1e3
    return {**common, "layer": layer_name, "ours_ms": ours[layout], "ours_layout": layout,
            "strategy": strategies[layout], "ours_nchw_ms": ours["nchw"], "ours_cl_ms": ours["cl"], **alternatives,
            "fastest_native_ms": fastest_native, "speedup_vs_native": fastest_native / ours[layout],
            "gflop": flops / 1e9, "mbytes": tensor_bytes / 1e6, "achieved_gflops": flops / ours[layout] / 1e6,
            "floor_ms": floor_ms, "x_floor": ours[layout] / floor_ms}


def conv_table(shapes: Sequence[Shape], dtypes: Sequence[torch.dtype], device: torch.device, repeats: int,
               segments: Sequence[int] | None = None) -> tuple[pd.DataFrame, dict]:
    """Times of both layers for every shape, dtype and segment count, with the roofline columns.

    Args:
        shapes: input shapes.
        dtypes: parameter and input dtypes.
        device: where to run.
        repeats: timed calls per measurement (the median is kept).
        segments: segment counts; ``None``: :func:`segment_counts` of each shape.

    Returns:
        ``(table, {dtype name: peak FLOP/s, "copy_bytes_per_s": bandwidth})``.
    """
    bandwidth = measure_copy_bandwidth(device)
    peaks = {str(d).removeprefix("torch."): measure_peak_flops(device, d, 4096 if device.type == "cuda" else 2048)
             for d in dtypes}
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            for count in segments or segment_counts(shape.channels):
                if shape.channels % count:
                    continue
                rows += _rows_for(shape, count, dtype, device, peaks[str(dtype).removeprefix("torch.")], bandwidth,
                                  repeats)
                print(f"  {shape.name} {dtype} segments={count}: done", file=sys.stderr, flush=True)
    return pd.DataFrame(rows), {**peaks, "copy_bytes_per_s": bandwidth}


def train_table(device: torch.device, images: int, peak: float, segments: Sequence[int | str]) -> pd.DataFrame:
    """Training throughput of a sweep trial (``continuum_small``, batch 128) with native and autotuned kernels.

    Args:
        device: where to train.
        images: synthetic 28 px training images per epoch (two epochs run; the second is measured).
        peak: the device's peak FLOP/s, for the model FLOP utilisation.
        segments: segment counts of the model.
    """
    data = make_synthetic(train_size=images, val_size=256, seed=0)
    rows = []
    for count in segments:
        row = {"model": "continuum_small", "segments": str(count), "images": images, "device": device_name(device)}
        flops = 2 * model_cost(timm.create_model("continuum_small", segments=count), (1, 28, 28)).macs
        for mode in ("native", "auto"):
            torch.manual_seed(0)
            model = timm.create_model("continuum_small", segments=count)
            with conv_strategy(mode):
                result = fit(model, data, TrainConfig(epochs=2, device=str(device)), progress=False)
            speed = result.curve[-1]["images_per_s"]
            row[f"{mode}_images_per_s"] = speed
            row[f"{mode}_mfu"] = speed * 3 * flops / peak
        row["speedup"] = row["auto_images_per_s"] / row["native_images_per_s"]
        rows.append(row)
        print(f"  train segments={count}: done", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m continuum.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    parser.add_argument("--dtypes", default="fp32", help="comma list of fp32, bf16 (default: fp32)")
    parser.add_argument("--shapes", default="xception_middle,small_64,small_128,small_256",
                        help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--segments", default=None, help="comma list of segment counts (default: 1, 2, 4, ... all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (default: 5)")
    parser.add_argument("--train", action="store_true", help="also measure a sweep trial's training throughput")
    parser.add_argument("--train-images", type=int, default=2560, help="images per training epoch (default: 2560)")
    parser.add_argument("--no-conv", action="store_true", help="skip the layer timings")
    parser.add_argument("--out", default="results/bench", help="folder for the CSVs (default: results/bench)")
    return parser


def _choices(text: str, known: dict, what: str) -> list:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"{what} {unknown or text!r} not known; choose from {', '.join(known)}")
    return [known[n] for n in names]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        dtypes = _choices(args.dtypes, DTYPES, "dtype(s)")
        shapes = _choices(args.shapes, SHAPES, "shape(s)")
        segments = [int(s) for s in args.segments.split(",")] if args.segments else None
        if args.repeats < 1:
            raise ValueError(f"--repeats {args.repeats} is not valid; time at least one call")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = device.type
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    peak = None
    if not args.no_conv:
        table, peaks = conv_table(shapes, dtypes, device, args.repeats, segments)
        table.to_csv(out / f"conv_{tag}.csv", index=False)
        print("peak GEMM: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items() if k in
                                         ("float32", "bfloat16")) + f"; copy {peaks['copy_bytes_per_s'] / 1e9:.1f} GB/s")
        columns = ["shape", "dtype", "layer", "segments", "ours_ms", "ours_layout", "strategy", "native_nchw_ms",
                   "native_cl_ms", "timm_separable_ms", "speedup_vs_native", "achieved_gflops", "floor_ms", "x_floor"]
        print(table[[c for c in columns if c in table]].to_markdown(index=False, floatfmt=".3g"))
        print(f"table: {out / f'conv_{tag}.csv'}")
        peak = peaks.get("float32")
    if args.train:
        peak = peak or measure_peak_flops(device, torch.float32, 4096 if device.type == "cuda" else 2048)
        counts = [1, 2, 4, 8, 16, 32, "all"]
        train = train_table(device, args.train_images, peak, counts)
        train.to_csv(out / f"train_{tag}.csv", index=False)
        print(train.to_markdown(index=False, floatfmt=".3g"))
        print(f"table: {out / f'train_{tag}.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
