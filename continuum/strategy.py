"""The segmented-conv tuner: which of the equivalent strategies of :mod:`continuum.kernels` a call runs.

With the strategy mode ``"auto"`` (the default), the first call for a given device, dtype, memory format, shape and
geometry screens every candidate (forward, plus backward when a gradient is wanted; warmed up, so that one-off costs
do not count), skipping any whose FLOPs at the device's peak GEMM rate would already be slower than the best so far,
then times the fastest few and the plain grouped conv again, longer for short calls, and keeps the lowest median.
Choices are cached in memory and in ``$CONTINUUM_CACHE/conv_strategies.json`` (default ``~/.cache/continuum``), so
later processes on the same machine reuse them. Because ``grouped/g`` for every divisor ``g`` is a candidate, a count
that is a multiple of another can always run as fast as it; whether the tuner picks that is up to its timings.

Mode ``"native"`` always runs the plain grouped conv; it is also used while tracing or compiling (``torch.compile``
chooses its own kernels) and when deterministic algorithms are requested. Set the mode with
``$CONTINUUM_CONV_STRATEGY`` or :func:`conv_strategy`.

The tuner's state (mode, choices, peak rates, the disk cache) lives in one :class:`Tuner`, :data:`TUNER`.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import os
import statistics
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from continuum.files import atomic_write, cache_root
from continuum.kernels import ConvGeometry, Strategy, candidates, is_channels_last, output_pixels, run_strategy, \
    strategy_flops
from continuum.timing import call_times, device_name, dtype_name, interleaved_times, measure_peak_flops

MODES = ("auto", "native")
"""Strategy modes: autotune per shape, or always the plain grouped conv."""

CACHE_FILE = "conv_strategies.json"
"""The disk cache's file name in the cache root."""


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a ``ValueError`` naming them."""
    if mode not in MODES:
        raise ValueError(f"conv strategy mode {mode!r} is not valid; choose one of {', '.join(MODES)} "
                         "(set CONTINUUM_CONV_STRATEGY or continuum.strategy.conv_strategy)")
    return mode


def cache_key(x: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, grad: bool) -> str:
    """The autotuning cache key: device, dtype (and autocast), memory formats of input and kernels, shapes,
    geometry and whether a gradient is wanted."""
    layout = "/".join("cl" if t.dim() == 4 and is_channels_last(t) else "nchw" for t in (x, weight))
    return "|".join(str(part) for part in (
        torch.__version__, device_name(x.device), dtype_name(x.dtype),
        f"autocast {torch.get_autocast_dtype(x.device.type)}" if torch.is_autocast_enabled(x.device.type) else "",
        layout, tuple(x.shape),
        tuple(weight.shape), geom.stride, geom.padding, geom.dilation, geom.groups, "fwd+bwd" if grad else "fwd"))


def call_signature(x: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, grad: bool) -> tuple:
    """What :func:`cache_key` depends on within one process, as a tuple of values torch has at hand: the in-memory
    lookup of every call. It has to be cheap: right after a large convolution the interpreter's caches are cold,
    and building the string key then took 50 us, 3-5 % of a 1-2 ms depthwise conv. Strides stand for the memory
    formats."""
    autocast = torch._C._is_any_autocast_enabled() and (
        torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type))
    return (x.shape, x.stride(), x.dtype, x.device, autocast, weight.shape, weight.stride(), geom, grad,
            torch.get_num_threads())


def tuning_ms() -> float:
    """How long autotuning times each finalist, in milliseconds: ``$CONTINUUM_TUNE_MS``, default 200. Less tunes
    faster and picks less reliably among near-equal strategies."""
    text = os.environ.get("CONTINUUM_TUNE_MS", "").strip() or "200"
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"CONTINUUM_TUNE_MS={text!r} is not valid; give milliseconds >= 0, such as 200")
    return value


def check_environment() -> None:
    """Refuse a bad ``$CONTINUUM_CONV_STRATEGY``, ``$CONTINUUM_TUNE_MS`` or ``$CONTINUUM_CACHE`` before a run
    starts (raising ``ValueError`` naming the variable), rather than in the middle of a trial."""
    check_mode(os.environ.get("CONTINUUM_CONV_STRATEGY", "auto").strip().lower() or "auto")
    tuning_ms()
    root = cache_root()
    if root.exists() and not root.is_dir():
        raise ValueError(f"CONTINUUM_CACHE={root} is not a folder; point it at a folder (or unset it)")


def autotune(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: ConvGeometry, grad: bool,
             finalists: int = 3, screen_ms: float = 10.0, final_ms: float | None = None, margin: float = 0.03
             ) -> tuple[Strategy, dict[str, float]]:
    """Time the candidates on fresh tensors shaped like these and return the fastest with all times.

    A screening pass warms each candidate up and keeps its fastest call (timed until the calls add up to
    ``screen_ms``), skipping any whose FLOPs at the device's peak GEMM rate would take longer than the best so
    far, or that fails (out of memory, unsupported); its time is then ``nan``. The ``finalists`` fastest, and the
    plain grouped conv in both memory formats, are then timed again in turns (:func:`interleaved_times`: at least
    3 rounds, and more until each one's calls add up to ``final_ms``), and the lowest median wins if it beats the
    plain grouped conv by ``margin``; else the plain grouped conv does. Tuning times a strategy warm, in a tight
    loop; in a network its extra small operations (placing kernels block-diagonally, converting memory formats)
    run with cold caches and cost more, so a near tie goes to the native kernel.

    Args:
        x: an input of the shape, dtype, device and memory format to tune for.
        weight: the kernels.
        bias: the bias or ``None``.
        geom: stride, padding, dilation and groups.
        grad: time forward + backward (else forward only).
        finalists: candidates timed again after the screening pass, besides the plain grouped conv.
        screen_ms: time each candidate for about this long in the screening pass.
        final_ms: time each finalist for about this long; ``None``: :func:`tuning_ms`.
        margin: how much faster (a fraction) than the plain grouped conv another strategy must be to win.

    Returns:
        ``(fastest, {strategy name: median ms of a finalist, or the screening pass's best ms})``.
    """
    device = x.device
    probe = torch.randn_like(x).requires_grad_(grad)
    kernels = weight.detach().clone().requires_grad_(grad)
    shift = None if bias is None else bias.detach().clone().requires_grad_(grad)
    forward_flops = 2.0 * weight.numel() * x.shape[0] * output_pixels(x, weight, geom)
    peak = peak_gemm_flops(device, x.dtype)

    def call(strategy: Strategy) -> None:
        with torch.set_grad_enabled(grad):
            y = run_strategy(strategy, probe, kernels, shift, geom)
            if grad:
                y.backward(torch.ones_like(y))

    times: dict[str, float] = {}
    found: dict[Strategy, float] = {}
    for strategy in candidates(x.shape[1], weight.shape[0], tuple(weight.shape[2:]), geom):
        times[strategy.name] = float("nan")
        best = min(found.values(), default=float("inf"))
        if strategy_flops(strategy, geom, forward_flops) * (3 if grad else 1) / peak * 1e3 > best:
            continue
        try:
            found[strategy] = times[strategy.name] = min(call_times(
                lambda: call(strategy), device, repeats=1, min_total_ms=screen_ms, give_up_ms=3 * best))
        except (RuntimeError, ValueError):
            continue
    if not found:
        return Strategy("grouped", geom.groups), times
    native = {Strategy("grouped", geom.groups, cl) for cl in (False, True)} & found.keys()
    final = sorted(set(sorted(found, key=found.get)[:finalists]) | native, key=found.get)
    rounds = interleaved_times({s.name: functools.partial(call, s) for s in final}, device, rounds=3,
                               min_total_ms=tuning_ms() if final_ms is None else final_ms)
    times |= {name: statistics.median(ms) for name, ms in rounds.items()}
    fastest = min(final, key=lambda s: times[s.name])
    plain = min(native, key=lambda s: times[s.name], default=fastest)
    return (fastest if times[fastest.name] < (1 - margin) * times[plain.name] else plain), times


class Tuner:
    """The tuner's state, in one place: the mode, the choices (by call signature and by cache key), the peak
    rates, and the disk cache behind them (read once, when first needed)."""

    def __init__(self) -> None:
        self.mode: str | None = None  # set by conv_strategy(); else the environment's
        self.env_mode: str | None = None
        self.choices: dict[str, Strategy] = {}
        self.by_signature: dict[tuple, Strategy] = {}
        self.peaks: dict[str, float] = {}
        self.disk_loaded = False
        self.used: dict[tuple, Strategy] | None = None  # filled inside recording()

    def current_mode(self) -> str:
        """The mode set by :func:`conv_strategy`, else ``$CONTINUUM_CONV_STRATEGY`` (read when first needed, and
        again after :meth:`forget`), else ``auto``."""
        if self.mode:
            return self.mode
        if self.env_mode is None:
            self.env_mode = check_mode(os.environ.get("CONTINUUM_CONV_STRATEGY", "auto").strip().lower() or "auto")
        return self.env_mode

    def forget(self) -> None:
        """Drop the in-memory choices and peaks, and the mode read from the environment (the disk cache and
        ``$CONTINUUM_CONV_STRATEGY`` are read again when next needed)."""
        self.env_mode = None
        self.choices.clear()
        self.by_signature.clear()
        self.peaks.clear()
        self.disk_loaded = False

    @staticmethod
    def cache_path() -> Path:
        """The disk cache: ``conv_strategies.json`` in the cache root."""
        return cache_root() / CACHE_FILE

    def read_disk(self) -> dict[str, str | float]:
        """The disk cache's entries (strategy names and peak rates); a missing or garbled file reads as empty."""
        try:
            stored = json.loads(self.cache_path().read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in stored.items() if isinstance(v, (str, float))} if isinstance(stored, dict) else {}

    def write_disk(self, key: str, value: str | float) -> None:
        """Add one entry to the disk cache (a read-only cache folder only costs a re-tune in the next process)."""
        stored = self.read_disk() | {key: value}
        try:
            atomic_write(self.cache_path(), lambda p: p.write_text(json.dumps(stored, indent=0, sort_keys=True)))
        except OSError:
            pass

    def peak(self, device: torch.device, dtype: torch.dtype) -> float:
        """The peak FLOP/s autotuning bounds candidates with: measured once per machine and cached."""
        key = f"peak|{torch.__version__}|{device_name(device)}|{dtype}"
        if key not in self.peaks:
            stored = self.read_disk().get(key)
            valid = isinstance(stored, float) and math.isfinite(stored) and stored > 0
            self.peaks[key] = stored if valid else measure_peak_flops(device, dtype)
            if not valid:
                self.write_disk(key, self.peaks[key])
        return self.peaks[key]

    def choose(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: ConvGeometry
               ) -> Strategy:
        """The strategy ``auto`` uses for this call: cached, or autotuned now (and cached in memory and on disk)."""
        grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        signature = call_signature(x, weight, geom, grad)
        strategy = self.by_signature.get(signature)
        if strategy is None:
            strategy = self.by_signature[signature] = self._tuned(x, weight, bias, geom, grad)
        if self.used is not None:
            self.used[signature] = strategy
        return strategy

    @contextmanager
    def recording(self) -> Iterator[dict[tuple, Strategy]]:
        """Within the block, record the strategy each autotuned call ran with, ``{call signature: strategy}``."""
        self.used = {}
        try:
            yield self.used
        finally:
            self.used = None

    def _tuned(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: ConvGeometry,
               grad: bool) -> Strategy:
        """The choice stored under this call's :func:`cache_key` (in memory or on disk), or autotuned now."""
        key = cache_key(x, weight, geom, grad)
        if key not in self.choices and not self.disk_loaded:
            for stored_key, name in self.read_disk().items():
                try:
                    self.choices[stored_key] = Strategy.parse(name)  # a peak (float) or a garbled name is skipped
                except (AttributeError, ValueError):
                    continue
            self.disk_loaded = True
        fitting = candidates(x.shape[1], weight.shape[0], tuple(weight.shape[2:]), geom)
        if self.choices.get(key) not in fitting:  # not tuned yet, or a cache entry that cannot compute this conv
            with torch.no_grad() if not grad else torch.enable_grad():
                strategy, _ = autotune(x, weight, bias, geom, grad)
            self.choices[key] = strategy
            self.write_disk(key, strategy.name)
        return self.choices[key]


TUNER = Tuner()
"""The process's tuner."""


def strategies_fingerprint(used: dict[tuple, Strategy]) -> str:
    """A short text naming the strategies a run's segmented convs ran with, to tell runs whose kernels differed (it
    can change the third decimal of an accuracy): the count per strategy and a hash of every (call, strategy)
    pair, such as ``grouped/1 x6, unfold x2 #3fa2c1d9``; ``native`` when no call was autotuned.

    Args:
        used: what :meth:`Tuner.recording` recorded.
    """
    if not used:
        return "native"
    pairs = sorted(f"{signature}={strategy.name}" for signature, strategy in used.items())
    counts = collections.Counter(strategy.name for strategy in used.values())
    digest = hashlib.sha1("\n".join(pairs).encode()).hexdigest()[:8]
    return ", ".join(f"{name} x{count}" for name, count in sorted(counts.items())) + f" #{digest}"


def current_mode() -> str:
    """The strategy mode in force (see :meth:`Tuner.current_mode`)."""
    return TUNER.current_mode()


@contextmanager
def conv_strategy(mode: str) -> Iterator[None]:
    """Run segmented convolutions in ``mode`` (``"auto"`` or ``"native"``) inside the ``with`` block.

    Args:
        mode: ``"auto"`` (fastest equivalent strategy, autotuned) or ``"native"`` (plain grouped conv).
    """
    previous, TUNER.mode = TUNER.mode, check_mode(mode)
    try:
        yield
    finally:
        TUNER.mode = previous


def peak_gemm_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The peak FLOP/s autotuning bounds candidates with (see :meth:`Tuner.peak`)."""
    return TUNER.peak(device, dtype)


def chosen_strategy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: ConvGeometry
                    ) -> Strategy:
    """The strategy ``auto`` uses for this call (see :meth:`Tuner.choose`)."""
    return TUNER.choose(x, weight, bias, geom)


def forget_choices() -> None:
    """Drop what the tuner knows in memory (see :meth:`Tuner.forget`)."""
    TUNER.forget()


def use_native(x: torch.Tensor) -> bool:
    """Mode ``native``, deterministic algorithms, tensors without data (the ``meta`` device), or tracing:
    ``torch.jit.trace``, ``torch.compile`` / ``export``, or ``torch.fx`` symbolic tracing (which passes a ``Proxy``,
    not a tensor)."""
    return current_mode() == "native" or not isinstance(x, torch.Tensor) or x.is_meta \
        or torch.are_deterministic_algorithms_enabled() or torch._C._is_tracing() or torch.compiler.is_compiling()


def segmented_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: ConvGeometry
                     ) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` by the fastest equivalent strategy.

    Args:
        x: ``N x C x H x W``.
        weight: ``O x C/groups x kh x kw``.
        bias: ``O`` or ``None``.
        geom: stride, padding, dilation and groups.

    Returns:
        ``N x O x H' x W'``.
    """
    if use_native(x):
        return F.conv2d(x, weight, bias, geom.stride, geom.padding, geom.dilation, geom.groups)
    return run_strategy(TUNER.choose(x, weight, bias, geom), x, weight, bias, geom)
