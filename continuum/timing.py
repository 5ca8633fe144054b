"""Timing on a device: its name and libraries, stopwatches for calls, paired interleaved rounds and the interval of
their ratios, the peak GEMM rate, a reference workload, and how busy other processes kept the machine meanwhile.

Used by the conv tuner, the cost probe and the benchmark alike.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import platform
import random
import time
from pathlib import Path
from typing import Callable, Collection, Sequence

import torch
import torch.nn.functional as F


def device_name(device: torch.device) -> str:
    """What a timing depends on: the CPU model and thread count, or the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} x{torch.get_num_threads()} threads"


@functools.lru_cache(maxsize=None)
def cpu_info() -> dict[str, str]:
    """The first processor's fields in ``/proc/cpuinfo`` (``model name``, ``cpu family``, ``model``, ``flags``,
    ...); empty off Linux."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the end of the first processor's block
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers (``AMD EPYC family 25 model 17``: a VM's model name
    alone may hide which generation it runs on), else what the platform says."""
    info = cpu_info()
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        return f"{name} family {info['cpu family']} model {info['model']}"
    return name


def machine_key(device: torch.device) -> str:
    """What a cached timing or kernel choice holds for: :func:`device_name` and, on a CPU, a hash of its feature
    flags (two CPUs of one model may offer different instructions: a VM can hide some)."""
    if device.type == "cuda":
        return device_name(device)
    return f"{device_name(device)} flags {cpu_flags_digest()}"


@functools.lru_cache(maxsize=None)
def kernel_library(device_type: str) -> str:
    """The convolution library whose kernels a timing measures, with its version: ``onednn 3.12.0`` on CPUs (read
    from torch's build configuration), ``cudnn 91002`` on CUDA; ``unknown`` where torch does not say."""
    if device_type == "cuda":
        return f"cudnn {torch.backends.cudnn.version()}"
    found = re.search(r"(?:MKL-DNN|oneDNN)\D*v?([0-9][0-9.]*)", torch.__config__.show())
    return f"onednn {found.group(1)}" if found else "unknown"


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``: ``avx2``, ``avx512_bf16``, ...); empty off Linux."""
    return frozenset(cpu_info().get("flags", "").split())


def cpu_flags_digest() -> str:
    """A short hash of :func:`cpu_flags`, for keys of what was built or tuned for them."""
    return hashlib.sha1(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:8]


def dtype_name(dtype: torch.dtype) -> str:
    """``float32``, ``bfloat16``, ...: the dtype without its ``torch.`` prefix."""
    return str(dtype).removeprefix("torch.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_times(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1,
               min_total_ms: float = 0.0, max_repeats: int = 100, give_up_ms: float = float("inf")) -> list[float]:
    """Milliseconds of each timed call of ``fn()``, after ``warmup`` untimed calls.

    Times at least ``repeats`` calls, and more (up to ``max_repeats``) until the timed calls add up to
    ``min_total_ms``, so a short call is timed often enough for its median to be steady.

    Args:
        fn: the call to time.
        device: where it runs (CUDA is synchronised around each call, so the time is the kernels' and not the
            launch's).
        repeats: timed calls at least.
        warmup: untimed calls first (allocator, kernel selection, caches).
        min_total_ms: keep timing until the timed calls add up to this.
        max_repeats: timed calls at most.
        give_up_ms: stop at once when a timed call is slower than this (it cannot win).
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_total_ms and len(times) < max_repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        if times[-1] > give_up_ms:
            break
    return times


def interleaved_times(calls: dict[str, Callable[[], None]], device: torch.device, rounds: int,
                      min_total_ms: float, max_rounds: int = 50, contexts: Sequence[Sequence[str]] = (),
                      references: Collection[str] = ()) -> dict[str, list[float]]:
    """Milliseconds of each call, timed in rounds of one call each, so that a slow spell of the machine hits every
    call of a round alike: round ``i`` of two calls is a fair pair. Each round runs the calls in a new (seeded)
    random order, so that no call always follows the same one (caches, the previous call's memory) or always
    comes first.

    Args:
        calls: ``{column name: call}``, each already warm.
        device: where they run.
        rounds: rounds at least.
        min_total_ms: go on (up to ``max_rounds``) until every call's timed calls add up to this.
        max_rounds: rounds at most.
        contexts: groups of names that run together in a round (each group's calls in random order, the groups
            in random order), each group after an untimed call of a random member: so that every timed call
            follows one of its own kind, as in a model, whose layers share one memory format (on CPUs a
            channels-last conv right after an NCHW one can take 20-30 % longer). Names in no group form one more.
        references: names of calls timed in every round beside the others (e.g. a copy whose speed gives a
            roofline floor in the same rounds) that do not count toward ``min_total_ms``: a short reference does
            not add rounds.

    Returns:
        ``{column name: one time per round}``.
    """
    grouped = {name for group in contexts for name in group}
    rest = [name for name in calls if name not in grouped]
    blocks = [list(group) for group in contexts if group] + ([rest] if rest else [])
    times: dict[str, list[float]] = {name: [] for name in calls}
    rng = random.Random(0)
    done = 0
    tallied = [times[name] for name in calls if name not in references]
    while done < rounds or (min(map(sum, tallied), default=math.inf) < min_total_ms and done < max_rounds):
        rng.shuffle(blocks)
        for block in blocks:
            if contexts:
                calls[rng.choice(block)]()  # untimed: sets the context; any member, so that none is favoured
            for name in rng.sample(block, len(block)):
                times[name] += call_times(calls[name], device, repeats=1, warmup=0)
        done += 1
    return times


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of ``values``: the order statistics whose binomial tail
    probabilities leave at most ``(1 - confidence) / 2`` on each side (the whole range when there are too few
    values for that, which is then wider than asked)."""
    ordered = sorted(values)
    n = len(ordered)
    tail, outside = 0.0, 0  # values left outside the interval on each side
    for count in range(n // 2):
        tail += math.comb(n, count) / 2 ** n  # P(count or fewer values fall below the median)
        if tail > (1 - confidence) / 2:
            break
        outside = count
    return ordered[outside], ordered[n - 1 - outside]


@functools.lru_cache(maxsize=None)
def _reference_tensors(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device).manual_seed(0)
    return (torch.randn(16, 64, 16, 16, device=device, generator=generator),
            torch.randn(64, 64, 3, 3, device=device, generator=generator))


def reference_ms(device: torch.device, repeats: int = 20) -> float:
    """The fastest of ``repeats`` calls of a fixed workload (a 3x3 convolution, 64 channels, 16 images of 16 px:
    0.3 GFLOP, a few milliseconds on a CPU): compared with its time on a quiet machine, it tells whether something
    else is slowing this device down right now. (The fastest of 20 still varies by up to 1.4x on a quiet 2-core
    VM; another process on one of its cores slows it 2x.)"""
    x, w = _reference_tensors(device)
    with torch.autocast(device.type, enabled=False), torch.no_grad():  # float32 whatever the caller's context
        return min(call_times(lambda: F.conv2d(x, w, padding=1), device, repeats))


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 3) -> float:
    """Dense GEMM FLOP/s on ``device`` in ``dtype``: the better of a ``size`` x ``size`` matrix product and a GEMM
    of the same width run as a 1x1 channels-last convolution (on CPUs the convolution library's GEMM can be twice
    as fast as the BLAS one); the best of ``repeats`` calls each."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    x = torch.randn(8, size, 16, 16, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = a.view(size, size, 1, 1).contiguous(memory_format=torch.channels_last)
    rates = []
    for call, flops in ((lambda: a @ a, 2 * size ** 3), (lambda: F.conv2d(x, w), 2 * 8 * 256 * size ** 2)):
        best_ms = min(call_times(call, device, repeats))
        rates.append(flops / (best_ms / 1e3))
    return max(rates)


def _cpu_jiffies() -> tuple[int, int] | None:
    """``(busy, total)`` CPU time of the whole machine so far, in clock ticks (``/proc/stat``); ``None`` off
    Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


class OtherLoad:
    """How much of the machine's CPU time other processes used during a ``with`` block: :attr:`share`, from 0
    (quiet) to 1 (every core busy with other work), or ``None`` where the system does not say (not Linux)."""

    share: float | None = None

    def __enter__(self) -> OtherLoad:
        self._start = _cpu_jiffies(), os.times()
        return self

    def __exit__(self, *exc: object) -> None:
        (machine, own), end = self._start, _cpu_jiffies()
        if machine is None or end is None or end[1] <= machine[1]:
            return
        now = os.times()
        own_ticks = (now.user + now.system - own.user - own.system) * os.sysconf("SC_CLK_TCK")
        self.share = min(1.0, max(0.0, (end[0] - machine[0] - own_ticks) / (end[1] - machine[1])))

    @property
    def other_cores(self) -> float | None:
        """How many cores other processes kept busy on average (``share`` times the machine's cores)."""
        return None if self.share is None else self.share * (os.cpu_count() or 1)
