"""``python -m continuum.bench``: is a segmented convolution as fast as it can be, at every segment count?

For each shape and segment count it times forward + backward of :class:`~continuum.block.SegmentedConv2d` and
:class:`~continuum.block.ContinuumConv` (autotuned strategy; the layer in NCHW on NCHW input and in channels-last
on channels-last input, the faster kept) against the native ``nn.Conv2d`` in NCHW and in channels-last (and timm's
``SeparableConv2d`` where it applies), and against the same layer at the previous segment count. All of a row's
calls are timed in turn, round after round, so that the machine's slow spells hit them alike, the NCHW calls
together and the channels-last ones together (as in a model); ratios are medians of per-round ratios with 95 %
bootstrap intervals. Beside each time is the roofline floor
``max(FLOPs / peak GEMM FLOP/s, bytes / copy bandwidth)``: the peak measured on the device first, the bandwidth
from a copy timed in the same rounds as the layers (the machine's memory speed moves between runs, on a VM up to
2x), whose two tensors together are as large as the layer's four (input, output and their gradients): a cache
that holds a layer's tensors moves them faster than memory, and one that holds half of them moves a smaller copy at
a speed between the two (a 32 MiB L3). ``x_floor`` is the median per-round ratio of the layer to that round's
floor, with its 95 % interval. The layers are tuned from an empty strategy cache
(``--tuning cold``), or from one while other processes keep every core busy (``--tuning loaded``: the tuner must
notice and not be fooled), or from the user's cache (``--tuning cached``).
``--train`` adds the training throughput of a sweep trial (images/s, model FLOP utilisation) in NCHW and
channels-last, with native kernels and with autotuned ones (and in bf16 with ``--dtypes bf16``, through
``torch.compile`` with ``--train-compile``).

    python -m continuum.bench                                 # CPU, fp32, every shape; results/bench/conv_cpu.csv
    python -m continuum.bench --shapes 96x28x64,small_128 --tuning loaded
    python -m continuum.bench --device cuda --dtypes fp32,bf16 --train

Prints one table per section and writes CSVs named after the device under ``--out``; the tuner's evidence for
each choice (or why it did not tune) goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import pandas as pd
import timm
import torch
from timm.layers import SeparableConv2d
from torch import nn

import continuum.models  # noqa: F401  (registers the models with timm)
from continuum.allocator import keep_freed_memory
from continuum.analysis import bootstrap_interval
from continuum.block import ContinuumConv, SegmentedConv2d
from continuum.config import TrainConfig, checked, choice, comma_items, comma_list, integer, number
from continuum.cost import model_cost
from continuum.data import make_synthetic
from continuum.files import atomic_write, check_writable_folder
from continuum.knobs import Segments, parse_segments
from continuum.strategy import TUNER, call_signature, check_environment, chosen_strategy, conv_strategy, \
    forget_choices
from continuum.strategy import log as strategy_log
from continuum.timing import device_name, dtype_name, interleaved_times, kernel_library, \
    measure_peak_flops, median_interval
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

    def input_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one input tensor of ``dtype`` (``batch x channels x size x size``)."""
        return self.batch * self.channels * self.size ** 2 * (torch.finfo(dtype).bits // 8)

    def layer_bytes(self, dtype: torch.dtype) -> int:
        """Bytes a layer's forward and backward pass keep in memory at this shape: its input, output (the same
        size) and their gradients."""
        return 4 * self.input_bytes(dtype)


SHAPES = {s.name: s for s in (
    Shape("xception_middle", 728, 19, 32),  # Xception's middle flow at 299 px
    Shape("small_64", 64, 28, 128),  # continuum_small's first stage on Fashion-MNIST
    Shape("small_128", 128, 32, 32),
    Shape("small_256", 256, 14, 32),
    Shape("tiny", 16, 8, 4),  # a smoke test
)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TUNINGS = ("cold", "loaded", "cached")
"""How the layers' strategies are tuned: from an empty cache on a quiet machine, from an empty cache while other
processes keep every core busy (the load stops before the timing starts), or from the user's cache as it is."""
TRAIN_MODEL = "continuum_small"
"""The model ``--train`` times: a sweep trial's (batch 128, 28 px images)."""


class TrainKind(NamedTuple):
    """One way a training run is timed.

    Args:
        channels_last: the model and its batches channels-last (else NCHW).
        mode: the conv strategy mode, ``auto`` or ``native``.
        precision: ``fp32`` or ``bf16``.
        compile: through ``torch.compile`` (``--compile``; inductor then generates the convs' and batch norm's code
            in place of the tuned kernels).
    """

    channels_last: bool
    mode: str
    precision: str
    compile: bool = False


TRAIN_KINDS = {
    "nchw_auto": TrainKind(False, "auto", "fp32"),  # what a trial ran with before channels-last became the default
    "cl_native": TrainKind(True, "native", "fp32"),
    "cl_auto": TrainKind(True, "auto", "fp32"),  # the default now where bf16 is not native
}
"""The ways a training run is always timed; :func:`train_kinds` adds bf16 and compiled ones on request."""
TRAIN_SPEEDUPS = {  # column: (the faster kind, the slower kind), where both ran
    "speedup": ("cl_auto", "nchw_auto"),
    "tuner_speedup": ("cl_auto", "cl_native"),
    "bf16_speedup": ("cl_auto_bf16", "cl_auto"),
    "bf16_total_speedup": ("cl_auto_bf16", "nchw_auto"),
    "compile_speedup": ("cl_compiled", "cl_auto"),
    "compile_bf16_speedup": ("cl_compiled_bf16", "cl_auto_bf16"),
}
"""The paired ratios of the training table, each with its 95 % interval (``_low``, ``_high``)."""


def train_kinds(bf16: bool, compiled: bool) -> dict[str, TrainKind]:
    """:data:`TRAIN_KINDS`, with ``cl_auto_bf16`` (the default where bf16 is native: ``--precision auto``) when
    ``bf16``, and ``cl_compiled`` (and ``cl_compiled_bf16``) when ``compiled``."""
    kinds = dict(TRAIN_KINDS)
    if compiled:
        kinds["cl_compiled"] = TrainKind(True, "auto", "fp32", compile=True)
    if bf16:
        kinds["cl_auto_bf16"] = TrainKind(True, "auto", "bf16")
    if bf16 and compiled:
        kinds["cl_compiled_bf16"] = TrainKind(True, "auto", "bf16", compile=True)
    return kinds


def parse_shapes(text: str) -> list[Shape]:
    """Shapes named in :data:`SHAPES`, or written ``CxHxB`` (channels, height = width, batch: ``96x28x64``)."""
    shapes = []
    for item in comma_items("--shapes", text):
        if item in SHAPES:
            shapes.append(SHAPES[item])
            continue
        numbers = item.lower().split("x")
        if len(numbers) != 3 or not all(n.isdigit() and int(n) > 0 for n in numbers):
            raise ValueError(f"--shapes: {item!r} is neither a known shape ({', '.join(SHAPES)}) nor CxHxB with "
                             "positive integers, such as 96x28x64")
        channels, size, batch = map(int, numbers)
        shapes.append(Shape(item.lower(), channels, size, batch))
    if not shapes:
        raise ValueError("--shapes: give at least one shape, such as small_64 or 96x28x64")
    return shapes


@contextmanager
def busy_machine(busy: bool = True) -> Iterator[None]:
    """Inside the block, one spinning process per core keeps the machine busy (nothing when ``busy`` is false)."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)] \
        if busy else []
    try:
        if spinners:
            time.sleep(0.2)  # let them start
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def segment_counts(channels: int) -> list[int]:
    """1, 2, 4, ... (powers of two that divide ``channels``), then ``channels`` divided by them, up to all."""
    powers = [2 ** i for i in range(channels.bit_length()) if channels % 2 ** i == 0]
    return sorted(set(powers) | {channels // p for p in powers})


def footprint_tensors(device: torch.device, footprint: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 tensors of about ``footprint`` bytes together on ``device`` (source, destination: both touched),
    for :func:`footprint_copy`. Where both fit in a cache a copy between them runs at that cache's speed (on a CPU
    with a 300 MiB L3, a 26 MB copy ran 2.2x as fast as a 256 MB one)."""
    src = torch.empty(max(footprint // 8, 1), device=device).normal_()
    return src, src.clone()


def footprint_copy(tensors: tuple[torch.Tensor, torch.Tensor], moved: float) -> tuple[Callable[[], None], int]:
    """A call copying ``tensors`` (:func:`footprint_tensors`) from the first to the second as many times as moving
    ``moved`` bytes takes (once at least), so that it lasts about as long as a layer's memory traffic; and the bytes
    it moves (read + write)."""
    src, dst = tensors
    per_copy = 2 * src.numel() * src.element_size()
    copies = max(1, math.ceil(moved / per_copy))

    def call() -> None:
        for _ in range(copies):
            dst.copy_(src)

    return call, copies * per_copy


def roofline_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The roofline's peak FLOP/s: :func:`~continuum.strategy.measure_peak_flops` with a GEMM big enough to fill
    the device (4096 wide on CUDA, 2048 on CPUs)."""
    return measure_peak_flops(device, dtype, 4096 if device.type == "cuda" else 2048)


def fwd_bwd(layer: nn.Module, x: torch.Tensor, mode: str = "auto") -> Callable[[], None]:
    """A call running ``layer`` forward and backward on ``x`` with segmented convs in strategy ``mode``. The
    gradients of ``x`` and of the parameters are returned, as a net's backward pass hands them on, not accumulated
    into ``.grad`` (which would add three passes over ``x`` to every call, a third of a depthwise conv's time).
    Making it runs the layer once, which autotunes it in mode ``auto``."""
    wanted = [t for t in (x, *layer.parameters()) if t.requires_grad]
    with conv_strategy(mode):
        upstream = torch.ones_like(layer(x))

    def call() -> None:
        with conv_strategy(mode):
            torch.autograd.grad(layer(x), wanted, upstream)

    return call


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> tuple[float, float, float]:
    """Median of the per-round ratios of two interleaved timings, with its 95 % bootstrap interval."""
    ratios = np.asarray(numerator) / np.asarray(denominator)
    low, high = bootstrap_interval(ratios, statistic=np.median)
    return float(np.median(ratios)), low, high


def _layer(name: str, channels: int, segments: int, dtype: torch.dtype, device: torch.device,
           channels_last: bool = False) -> nn.Module:
    """A benchmarked layer: ``SegmentedConv2d`` (the 3x3 conv alone), ``ContinuumConv`` (depthwise-first separable
    unit: the 3x3 conv and a 1x1 conv) or ``Conv2d`` (the native grouped conv)."""
    layer = {"SegmentedConv2d": lambda: SegmentedConv2d(channels, channels, 3, padding=1, segments=segments),
             "ContinuumConv": lambda: ContinuumConv(channels, channels, 3, segments=segments),
             "Conv2d": lambda: nn.Conv2d(channels, channels, 3, padding=1, groups=segments, bias=False)}[name]()
    return layer.to(device, dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _rows_for(shape: Shape, segments: int, dtype: torch.dtype, device: torch.device, peak: float,
              footprint: tuple[torch.Tensor, torch.Tensor], timing: dict[str, float],
              fewer: dict[str, tuple[int, str]], loaded: bool = False) -> list[dict]:
    """Both layers' rows at one segment count.

    Args:
        shape: the input shape.
        segments: the segment count.
        dtype: parameters and input.
        device: where to run.
        peak: the roofline's peak FLOP/s.
        footprint: the shape's :func:`footprint_tensors`, copied in the layers' rounds for the floor.
        timing: ``rounds`` and ``min_total_ms`` for :func:`interleaved_times`.
        fewer: per layer, the previous segment count and the input layout it ran fastest on; that layer at that
            count is timed in the same rounds, for a fair ``x_fewer_segments``. Updated with this count.
        loaded: tune the layers while other processes keep every core busy (:func:`busy_machine`).
    """
    c = shape.channels
    x = torch.randn(shape.batch, c, shape.size, shape.size, device=device, dtype=dtype, requires_grad=True)
    inputs = {"nchw": x, "cl": x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)}
    pixels = shape.batch * shape.size * shape.size
    common = {"shape": shape.name, "channels": c, "size": shape.size, "batch": shape.batch,
              "dtype": dtype_name(dtype), "segments": "all" if segments == c else str(segments),
              "device": device_name(device)}
    rows = []
    for name, native, mode, extra_weights, tensors in (("SegmentedConv2d", "Conv2d", "auto", 0, 2),
                                                       ("ContinuumConv", "ContinuumConv", "native", c * c, 3)):
        ours = {layout: _layer(name, c, segments, dtype, device, layout == "cl") for layout in inputs}
        with busy_machine(loaded):  # making the calls tunes the layers
            calls = {f"ours_{layout}_ms": fwd_bwd(ours[layout], inp) for layout, inp in inputs.items()}
        strategies = _strategies(ours, inputs)  # what the timing runs (a retry falling due during it may change it)
        calls |= {f"native_{layout}_ms": fwd_bwd(_layer(native, c, segments, dtype, device, layout == "cl"), inp,
                                                 mode)
                  for layout, inp in inputs.items()}
        if name == "ContinuumConv" and segments == c:
            calls["timm_separable_ms"] = fwd_bwd(SeparableConv2d(c, c, 3).to(device, dtype), x)
        contexts = {layout: [f"native_{layout}_ms", f"ours_{layout}_ms"] for layout in inputs}
        if "timm_separable_ms" in calls:
            contexts["nchw"].append("timm_separable_ms")
        if name in fewer:
            count, layout = fewer[name]
            calls["fewer_ms"] = fwd_bwd(_layer(name, c, count, dtype, device, layout == "cl"), inputs[layout])
            contexts[layout].append("fewer_ms")
        weights = c * c // segments * 9 + extra_weights
        tensor_bytes = 3 * (tensors * shape.input_bytes(dtype) + weights * x.element_size())
        calls["copy_ms"], copied = footprint_copy(footprint, tensor_bytes)
        times = interleaved_times(calls, device, **timing, contexts=list(contexts.values()), references=["copy_ms"])
        row = _row(common, name, times, strategies, flops=3 * 2 * pixels * weights, tensor_bytes=tensor_bytes,
                   copied=copied, peak=peak)
        fewer[name] = segments, row["ours_layout"]
        rows.append(row)
    return rows


def _strategies(layers: dict[str, nn.Module], inputs: dict[str, torch.Tensor]) -> dict[str, str]:
    """The strategy autotuning chose for each layout's layer on that layout's input (a depthwise-first unit's
    spatial conv sees the unit's input itself), marked ``(busy)`` where the tuner found the machine busy and runs
    the plain grouped conv until it tries again."""
    chosen = {}
    with conv_strategy("auto"):
        for layout, x in inputs.items():
            spatial = layers[layout] if isinstance(layers[layout], SegmentedConv2d) else layers[layout].spatial
            chosen[layout] = chosen_strategy(x, spatial.weight, None, spatial.geometry).name
            if call_signature(x, spatial.weight, spatial.geometry, grad=True) in TUNER.retry_at:
                chosen[layout] += " (busy)"
    return chosen


def _row(common: dict, layer_name: str, times: dict[str, list[float]], strategies: dict[str, str], flops: float,
         tensor_bytes: float, copied: float, peak: float) -> dict:
    """One table row: the layer (autotuned) on NCHW and on channels-last input, the faster kept, beside the native
    alternatives, the same layer at fewer segments (when timed) and the roofline floor. Times are medians over
    rounds; ratios are medians of per-round ratios, with 95 % intervals.

    Args:
        common: the shape's columns.
        layer_name: the layer's column.
        times: per call, one time per round (:func:`interleaved_times`): ``ours_{nchw,cl}_ms``, the natives,
            ``fewer_ms`` (when timed) and ``copy_ms`` (the footprint copy, moving ``copied`` bytes).
        strategies: the tuner's choice per layout.
        flops: the layer's forward + backward FLOPs.
        tensor_bytes: the bytes its forward + backward must move at least.
        copied: the bytes each ``copy_ms`` call moves.
        peak: the roofline's peak FLOP/s.
    """
    medians = {name: statistics.median(ms) for name, ms in times.items()}
    layout = "nchw" if medians["ours_nchw_ms"] <= medians["ours_cl_ms"] else "cl"
    ours_ms = medians[f"ours_{layout}_ms"]
    natives = [name for name in times if name not in ("ours_nchw_ms", "ours_cl_ms", "fewer_ms", "copy_ms")]
    fastest_native = min(natives, key=medians.get)
    speedup = paired_ratio(times[fastest_native], times[f"ours_{layout}_ms"])
    fewer = paired_ratio(times[f"ours_{layout}_ms"], times["fewer_ms"]) if "fewer_ms" in times else (math.nan,) * 3
    bandwidths = copied / (np.asarray(times["copy_ms"]) / 1e3)  # bytes/s, one per round
    floors_ms = np.maximum(flops / peak, tensor_bytes / bandwidths) * 1e3
    x_floor = paired_ratio(times[f"ours_{layout}_ms"], floors_ms)
    return {**common, "layer": layer_name, "ours_ms": ours_ms, "ours_layout": layout, "strategy": strategies[layout],
            **medians, "fastest_native_ms": medians[fastest_native],
            "speedup_vs_native": speedup[0], "speedup_low": speedup[1], "speedup_high": speedup[2],
            "x_fewer_segments": fewer[0], "x_fewer_low": fewer[1], "x_fewer_high": fewer[2],
            "gflop": flops / 1e9, "mbytes": tensor_bytes / 1e6, "achieved_gflops": flops / ours_ms / 1e6,
            "copy_gbps": float(np.median(bandwidths)) / 1e9, "floor_ms": float(np.median(floors_ms)),
            "x_floor": x_floor[0], "x_floor_low": x_floor[1], "x_floor_high": x_floor[2]}


def shape_counts(shape: Shape, segments: Sequence[Segments] | None) -> list[int]:
    """The segment counts timed at ``shape``: ``segments`` (``"all"``: its channels) that divide its channels, each
    once, in increasing order; ``None``: :func:`segment_counts`."""
    if segments is None:
        return segment_counts(shape.channels)
    counts = {shape.channels if count == "all" else count for count in segments}
    return sorted(count for count in counts if shape.channels % count == 0)


def conv_table(shapes: Sequence[Shape], dtypes: Sequence[torch.dtype], device: torch.device, rounds: int,
               min_total_ms: float, segments: Sequence[Segments] | None = None, loaded: bool = False
               ) -> tuple[pd.DataFrame, dict]:
    """Times of both layers for every shape, dtype and segment count, with the roofline columns.

    Args:
        shapes: input shapes.
        dtypes: parameter and input dtypes.
        device: where to run.
        rounds: timed rounds per measurement at least (medians are kept).
        min_total_ms: time each call for at least this long (more rounds for short calls).
        segments: segment counts (``"all"``: the shape's channels); ``None``: :func:`segment_counts` of each
            shape.
        loaded: tune each layer while other processes keep every core busy.

    Returns:
        ``(table, {dtype name: peak FLOP/s})``; each row's copy bandwidth (median over its rounds) is its
        ``copy_gbps``.
    """
    peaks = {dtype_name(d): roofline_peak(device, d) for d in dtypes}
    timing = {"rounds": rounds, "min_total_ms": min_total_ms}
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            fewer: dict[str, tuple[int, str]] = {}
            footprint = footprint_tensors(device, shape.layer_bytes(dtype))  # one pair for all of the shape's rows
            for count in shape_counts(shape, segments):
                rows += _rows_for(shape, count, dtype, device, peaks[dtype_name(dtype)], footprint, timing, fewer,
                                  loaded)
                print(f"  {shape.name} {dtype} segments={count}: done", file=sys.stderr, flush=True)
    return pd.DataFrame(rows), peaks


def targets(table: pd.DataFrame) -> str:
    """The targets, one line each: per layer, in how many rows it is more than 5 % slower than the fastest native
    alternative, slower than native at all (``speedup_vs_native`` below 1), and slower than at the previous,
    smaller segment count (``x_fewer_segments`` above 1), with how many of those the 95 % interval confirms and the
    worst; then the distance to the roofline floor of ``SegmentedConv2d`` at depthwise (target 1.5x) and at 2-16
    channels per segment (target 3x): in how many rows it is within, and in how many the 95 % interval is."""
    checks = (("more than 5 % slower than the fastest native alternative", "speedup_vs_native", "speedup", -1, 0.95),
              ("slower than the fastest native alternative", "speedup_vs_native", "speedup", -1, 1.0),
              ("slower than at the previous segment count", "x_fewer_segments", "x_fewer", 1, 1.0))
    lines = []
    for layer, rows in table.groupby("layer", sort=False):
        for what, column, interval, sign, line in checks:
            rows_checked = rows.dropna(subset=[column])
            if rows_checked.empty:  # e.g. one segment count: nothing to compare it with
                lines.append(f"{layer} {what}: no rows to compare")
                continue
            worse = sign * (rows_checked[column] - line) > 0
            sure = sign * (rows_checked[f"{interval}_{'low' if sign > 0 else 'high'}"] - line) > 0
            worst = rows_checked.loc[(sign * rows_checked[column]).idxmax()]
            lines.append(f"{layer} {what}: {worse.sum()} of {len(rows_checked)} rows, {sure.sum()} beyond noise "
                         f"(95 % interval); worst {worst[column]:.3f} [{worst[f'{interval}_low']:.3f}, "
                         f"{worst[f'{interval}_high']:.3f}] at {worst['shape']} segments {worst['segments']}")
    segmented = table[table["layer"] == "SegmentedConv2d"]
    counts = segmented.apply(lambda r: r["channels"] if r["segments"] == "all" else int(r["segments"]), axis=1)
    width = segmented["channels"] / counts  # channels per segment
    for what, rows, goal in (("depthwise", segmented[width == 1], 1.5),
                             ("2-16 channels per segment", segmented[(width >= 2) & (width <= 16)], 3.0)):
        if len(rows):
            lines.append(f"SegmentedConv2d {what}: x_floor {rows['x_floor'].min():.2f}-{rows['x_floor'].max():.2f} "
                         f"(target {goal}x); {(rows['x_floor'] <= goal).sum()} of {len(rows)} rows within it, "
                         f"{(rows['x_floor_high'] <= goal).sum()} beyond noise (95 % interval)")
    return "\n".join(lines)


def train_table(device: torch.device, images: int, peaks: dict[str, float], segments: Sequence[int | str],
                rounds: int = 2, kinds: dict[str, TrainKind] = TRAIN_KINDS) -> pd.DataFrame:
    """Training throughput of a sweep trial (``continuum_small``, batch 128, 28 px images) run each of ``kinds`` of
    way: NCHW or channels-last, native or autotuned kernels, fp32 or bf16, eager or compiled.

    Each round trains a fresh model for two epochs of each kind in turn and measures the second epoch; the best
    round per kind is kept (a slow spell of the machine lowers a round, it cannot raise one), and the speedups are
    medians of per-round ratios (paired: the two kinds ran in the same round) with their 95 % intervals (``_low``,
    ``_high``; with few rounds, the range of the ratios: a difference within it is not shown).

    Args:
        device: where to train.
        images: synthetic 28 px training images per epoch (the speed of Fashion-MNIST's).
        peaks: the device's peak FLOP/s per precision (``fp32``, ``bf16``), for the model FLOP utilisation.
        segments: segment counts of the model.
        rounds: trainings per kind.
        kinds: ``{name: how it trains}``.
    """
    data = make_synthetic(train_size=images, val_size=256, seed=0)
    rows = []
    for count in segments:
        row = {"model": TRAIN_MODEL, "segments": str(count), "images": images, "device": device_name(device)}
        flops = 2 * model_cost(timm.create_model(TRAIN_MODEL, segments=count), (1, 28, 28)).macs
        speeds: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(rounds):
            for kind, way in kinds.items():
                torch.manual_seed(0)
                model = timm.create_model(TRAIN_MODEL, segments=count)
                cfg = TrainConfig(epochs=2, device=str(device), channels_last=way.channels_last,
                                  precision=way.precision, compile=way.compile)
                with conv_strategy(way.mode):
                    result = fit(model, data, cfg, progress=False)
                speeds[kind].append(result.curve[-1]["images_per_s"])
        for kind, measured in speeds.items():
            row[f"{kind}_images_per_s"] = max(measured)
            row[f"{kind}_mfu"] = max(measured) * 3 * flops / peaks[kinds[kind].precision]
        for name, (faster, slower) in TRAIN_SPEEDUPS.items():
            if faster in speeds and slower in speeds:
                ratios = [a / b for a, b in zip(speeds[faster], speeds[slower])]
                row[name] = statistics.median(ratios)
                row[f"{name}_low"], row[f"{name}_high"] = median_interval(ratios)
        rows.append(row)
        print(f"  train segments={count}: done", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def build_parser(prog: str = "python -m continuum.bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    parser.add_argument("--dtypes", default="fp32", help="comma list of fp32, bf16 (default: fp32)")
    parser.add_argument("--shapes", default="xception_middle,small_64,small_128,small_256",
                        help=f"comma list of {', '.join(SHAPES)}, or CxHxB (channels x size x batch, e.g. 96x28x64)")
    parser.add_argument("--tuning", default="cold",
                        help="cold: tune from an empty cache; loaded: the same while other processes keep every core "
                             "busy; cached: the strategy cache as it is (default: cold)")
    parser.add_argument("--segments", default=None,
                        help="comma list of segment counts and 'all' (default: 1, 2, 4, ... all)")
    parser.add_argument("--repeats", default="5", help="timed calls per measurement at least (default: 5)")
    parser.add_argument("--min-ms", default="400",
                        help="time each measurement for at least this many ms, in more calls (default: 400)")
    parser.add_argument("--train", action="store_true", help="also measure a sweep trial's training throughput")
    parser.add_argument("--train-images", default="2560", help="images per training epoch (default: 2560)")
    parser.add_argument("--train-rounds", default="2",
                        help="trainings per kind of kernel, the fastest kept (default: 2)")
    parser.add_argument("--train-segments", default="1,4,16,all",
                        help="segment counts of the trained model (default: 1,4,16,all)")
    parser.add_argument("--train-compile", action="store_true",
                        help="also train through torch.compile (channels-last; the first epoch compiles)")
    parser.add_argument("--no-conv", action="store_true", help="skip the layer timings")
    parser.add_argument("--out", default="results/bench", help="folder for the CSVs (default: results/bench)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m continuum.bench") -> int:
    """Run the command with ``argv`` (``prog``: how it is called); returns the exit code (2: bad input)."""
    args = build_parser(prog).parse_args(argv)
    try:
        keep_freed_memory()
        device = resolve_device(args.device)
        dtypes = [DTYPES[name] for name in comma_list("--dtypes", choice(tuple(DTYPES)), "fp32,bf16",
                                                          named=True)(args.dtypes)]
        shapes = parse_shapes(args.shapes)
        train_segments = comma_list("--train-segments", parse_segments, "1,4,16,all")(args.train_segments)
        segments = None if args.segments is None else comma_list("--segments", parse_segments, "1,4,16,all")(
            args.segments)
        args.tuning = checked("--tuning", choice(TUNINGS), args.tuning)
        args.repeats = checked("--repeats", integer(1), args.repeats)
        args.train_rounds = checked("--train-rounds", integer(1), args.train_rounds)
        args.train_images = checked("--train-images", integer(64), args.train_images)  # one batch at least
        args.min_ms = checked("--min-ms", number(0), args.min_ms)
        for count in train_segments if args.train else ():
            try:  # a count that does not fit the model is refused now, not after the tables before it
                timm.create_model(TRAIN_MODEL, segments=count)
            except ValueError as err:
                raise ValueError(f"--train-segments {count}: {err}") from None
        if segments is not None and not args.no_conv:
            for shape in shapes:
                if not shape_counts(shape, segments):
                    raise ValueError(f"--segments {args.segments}: none divides the {shape.channels} channels of "
                                     f"shape {shape.name}; give divisors of it or 'all'")
        check_environment()
        check_writable_folder(Path(args.out), "--out")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = device.type
    logging.basicConfig(format="%(message)s")  # each tuning's evidence (or why it did not tune), on stderr
    logging.getLogger(strategy_log.name).setLevel(logging.DEBUG)
    if args.tuning != "cached":  # an empty strategy cache, for this run only
        os.environ["CONTINUUM_CACHE"] = tempfile.mkdtemp(prefix="continuum-bench-cache-")
        forget_choices()
    print(f"device: {device_name(device)}; torch {torch.__version__}; {kernel_library(device.type)}; "
          f"tuning: {args.tuning}")
    measured: dict[str, float] = {}  # peak FLOP/s by dtype name
    if not args.no_conv:
        table, measured = conv_table(shapes, dtypes, device, args.repeats, args.min_ms, segments,
                                  loaded=args.tuning == "loaded")
        table["tuning"] = args.tuning
        atomic_write(out / f"conv_{tag}.csv", lambda path: table.to_csv(path, index=False))
        gemm = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in measured.items())
        copies = table.groupby(["shape", "dtype"], sort=False)["copy_gbps"].agg(["min", "max"])
        print(f"peak GEMM: {gemm}; copy at each shape's layer footprint (input, output, their gradients), "
              "timed in each row's rounds: " + ", ".join(f"{shape} {dtype} {low:.1f}-{high:.1f} GB/s"
                                                          for (shape, dtype), (low, high) in copies.iterrows()))
        columns = ["shape", "dtype", "layer", "segments", "ours_ms", "ours_layout", "strategy", "native_nchw_ms",
                   "native_cl_ms", "timm_separable_ms", "speedup_vs_native", "speedup_low", "speedup_high",
                   "x_fewer_segments", "achieved_gflops", "floor_ms", "x_floor"]
        print(table[[c for c in columns if c in table]].to_markdown(index=False, floatfmt=".3g"))
        print(targets(table))
        print(f"table: {out / f'conv_{tag}.csv'}")
    if args.train:
        kinds = train_kinds(torch.bfloat16 in dtypes, args.train_compile)
        peaks = {precision: measured.get(dtype_name(DTYPES[precision])) or roofline_peak(device, DTYPES[precision])
                 for precision in {kind.precision for kind in kinds.values()}}
        train = train_table(device, args.train_images, peaks, train_segments, args.train_rounds, kinds)
        atomic_write(out / f"train_{tag}.csv", lambda path: train.to_csv(path, index=False))
        print(train.to_markdown(index=False, floatfmt=".3g"))
        print(f"table: {out / f'train_{tag}.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
