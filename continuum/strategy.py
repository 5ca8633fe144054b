"""The segmented-conv tuner: which of the equivalent strategies of :mod:`continuum.kernels` a call runs.

With the strategy mode ``"auto"`` (the default), the first call for a given device, dtype, memory format, shape and
geometry screens every candidate (forward, plus backward when a gradient is wanted; warmed up, so that one-off costs
do not count), skipping any whose FLOPs at the device's peak GEMM rate would already be slower than the best so far,
then times the fastest few and the plain grouped conv again in interleaved rounds. A strategy other than the plain
grouped conv is chosen only on evidence: the 95 % interval of the median of its per-round time ratios to the plain
conv must lie below ``1 - margin``; rounds are added while the interval straddles that line, and a lead still not
shown after :data:`MAX_ROUNDS` rounds goes to the plain conv.

A busy machine fools timings (a choice made while another process used a core ran 2x slower later, on a quiet
machine), so tuning checks for one (:meth:`Tuner.busy_reason`): on a Linux CPU it counts the CPU time other processes
used during a short probe before it tunes (:data:`PROBE_SECONDS`: a busy machine times nothing; convs tuned in a row
share one, :data:`QUIET_TRUSTED_SECONDS`) and while it tunes; on a GPU, or where the system does not report that, it
times a reference workload before and after against its fastest time seen (kept in the cache). When other processes
kept more cores busy than this process leaves free, or the reference ran slower than :data:`BUSY_SLOWDOWN` times its
quiet time, the result is neither trusted nor cached. A spell that fell within the tuning alone is probed for again
at once, and a machine quiet again is tuned again (:data:`TUNING_TRIES`); otherwise the call runs the plain grouped
conv, and tuning is tried again after :data:`RETRY_SECONDS`, twice as long after each further busy finding (up to
:data:`RETRY_MAX_SECONDS`), so that a machine busy for hours is not probed for ever.

Choices are cached in memory and in ``$CONTINUUM_CACHE/conv_strategies.json`` (default ``~/.cache/continuum``),
keyed by everything that changes the answer: torch and the convolution library's versions, the CPU model and thread
count (or the GPU), dtype and autocast, the memory formats, shapes, geometry and which gradients are wanted. A
process checks each choice it reads from disk on first use, in a few interleaved rounds against the plain grouped
conv, and drops one that loses (the plain conv is then cached in its place). Because ``grouped/g`` for every divisor
``g`` is a candidate, a count that is a multiple of another can always run as fast as it; whether the tuner picks
that is up to its timings.

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
import logging
import math
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Collection, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from continuum.files import SWITCHES, atomic_write, cache_root, env_switch
from continuum.kernels import ConvGeometry, Strategy, candidates, is_channels_last, output_pixels, run_strategy, \
    strategy_flops
from continuum.timing import OtherLoad, call_times, dtype_name, interleaved_times, kernel_library, \
    machine_key, measure_peak_flops, median_interval, reference_ms

MODES = ("auto", "native")
"""Strategy modes: autotune per shape, or always the plain grouped conv."""

CACHE_FILE = "conv_strategies.json"
"""The disk cache's file name in the cache root."""

CACHE_VERSION = "v8"
"""Part of every cache key: choices cached by a tuner that decided differently or from other candidates are not
reused (v1 trusted a 3 % lead in one median, busy machine or not; v2 had no ``rotated`` kernel, v3 its slower
backward, v4 timed each backward pass with an accumulation into the input's ``.grad`` and the slower ``fused``
backward, v5 offered ``rotated`` for 2-4 channels per segment only, v6 on AVX-512 CPUs only, v7 had no
``broadcast`` kernel)."""

MIN_ROUNDS = 5
"""Interleaved rounds a decision takes at least (fewer cannot give a 95 % interval narrower than their range)."""

MAX_ROUNDS = 40
"""Rounds after which a lead still not shown beyond noise goes to the plain grouped conv."""

VALIDATION_ROUNDS = 5
"""Rounds of the check of a choice read from the disk cache against the plain grouped conv."""

BUSY_SLOWDOWN = 1.75
"""The reference workload running this much slower than its quiet time, twice in a row, means the machine is busy
(on a quiet 2-core VM its time varied by up to 1.5x; another process on one of the cores slows it 2x)."""

RETRY_SECONDS = 15.0
"""How long a call runs the plain grouped conv after tuning found the machine busy, before tuning again (a slow
spell of a VM lasts seconds; the check before a retry costs about 0.1 s)."""

RETRY_MAX_SECONDS = 600.0
"""The longest wait between tries: the wait doubles after each busy finding for the same call, up to this."""

PROBE_SECONDS = 0.1
"""How long, on a CPU whose system reports CPU time, other processes' use is measured before tuning starts: a machine
already busy then is not timed at all (tuning a model's convs while another job runs cost more than the training)."""

TUNING_TRIES = 2
"""A tuning whose own window was busy, though the probe before it was quiet, is probed for and done again at once,
up to this many times in all: a moment's work of another process (on a quiet 2-core VM the tolerance was crossed
now and then while a benchmark ran alone) costs one more tuning, not a spell of the plain conv."""

QUIET_TRUSTED_SECONDS = 1.0
"""A quiet reading (the probe, or the window of the tuning just done) younger than this stands in for the probe: a
model's first forward pass tunes its convs one after another, and one probe covers them all (each tuning is still
checked in its own window)."""

log = logging.getLogger(__name__)


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a ``ValueError`` naming them."""
    if mode not in MODES:
        raise ValueError(f"conv strategy mode {mode!r} is not valid; choose one of {', '.join(MODES)} "
                         "(set CONTINUUM_CONV_STRATEGY or continuum.strategy.conv_strategy)")
    return mode


def env_mode() -> str:
    """The mode ``$CONTINUUM_CONV_STRATEGY`` sets (``auto`` when unset).

    Raises:
        ValueError: it names no mode.
    """
    return check_mode(os.environ.get("CONTINUUM_CONV_STRATEGY", "").strip().lower() or "auto")


def cache_key(x: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, grad: bool) -> str:
    """The autotuning cache key: everything that changes which strategy is fastest. The tuner's version, torch's and
    the convolution library's, the device (CPU model, feature flags and thread count, or GPU:
    :func:`~continuum.timing.machine_key`), dtype (and autocast), memory formats of input and kernels, shapes,
    geometry and which gradients are wanted (:func:`passes`)."""
    layout = "/".join("cl" if t.dim() == 4 and is_channels_last(t) else "nchw" for t in (x, weight))
    return "|".join(str(part) for part in (
        CACHE_VERSION, torch.__version__, kernel_library(x.device.type), machine_key(x.device), dtype_name(x.dtype),
        f"autocast {torch.get_autocast_dtype(x.device.type)}" if torch.is_autocast_enabled(x.device.type) else "",
        layout, tuple(x.shape),
        tuple(weight.shape), geom.stride, geom.padding, geom.dilation, geom.groups, passes(x, grad)))


def passes(x: torch.Tensor, grad: bool) -> str:
    """What a call computes: ``"fwd"``, ``"fwd+bwd"`` (input and kernel gradients) or ``"fwd+kernel bwd"`` (a
    backward pass for an input that needs no gradient, such as a net's first layer)."""
    return "fwd" if not grad else "fwd+bwd" if x.requires_grad else "fwd+kernel bwd"


def call_signature(x: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, grad: bool) -> tuple:
    """What :func:`cache_key` depends on within one process, as a tuple of values torch has at hand: the in-memory
    lookup of every call. It has to be cheap: right after a large convolution the interpreter's caches are cold,
    and building the string key then took 50 us, 3-5 % of a 1-2 ms depthwise conv. Strides stand for the memory
    formats."""
    autocast = torch._C._is_any_autocast_enabled() and (
        torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type))
    return (x.shape, x.stride(), x.dtype, x.device, autocast, weight.shape, weight.stride(), geom, grad,
            x.requires_grad, torch.get_num_threads())


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
    """Refuse a bad ``$CONTINUUM_CONV_STRATEGY``, ``$CONTINUUM_TUNE_MS``, ``$CONTINUUM_CACHE`` or on/off switch
    (``$CONTINUUM_BUILD_KERNELS``, ``$CONTINUUM_KEEP_FREED_MEMORY``) before a run starts (raising ``ValueError``
    naming the variable), rather than in the middle of a trial."""
    env_mode()
    tuning_ms()
    for switch in SWITCHES:
        env_switch(switch)
    root = cache_root()
    if root.exists() and not root.is_dir():
        raise ValueError(f"CONTINUUM_CACHE={root} is not a folder; point it at a folder (or unset it)")


class Tuning(NamedTuple):
    """What :func:`autotune` found.

    Args:
        strategy: the choice.
        times: ``{strategy name: median ms of a finalist, or the screening pass's best ms; nan: skipped}``.
        evidence: why, in words (the ratio to the plain grouped conv, its interval and the rounds).
    """

    strategy: Strategy
    times: dict[str, float]
    evidence: str


def _probe(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: ConvGeometry, grad: bool
           ) -> Callable[[Strategy], Callable[[], None]]:
    """For a strategy, a call running it (forward, and backward when ``grad``) on fresh tensors shaped like these.
    The backward pass computes the kernel gradient, and the input gradient where ``x`` needs one, and returns them
    as a net's backward pass hands them on (nothing accumulates into a ``.grad``, which would add three passes
    over the input to every call)."""
    probe = torch.randn_like(x).requires_grad_(grad and x.requires_grad)
    kernels = weight.detach().clone().requires_grad_(grad)
    shift = None if bias is None else bias.detach().clone().requires_grad_(grad)
    wanted = [t for t in (probe, kernels, shift) if t is not None and t.requires_grad]

    def call(strategy: Strategy) -> None:
        with torch.set_grad_enabled(grad):
            y = run_strategy(strategy, probe, kernels, shift, geom)
            if grad:
                torch.autograd.grad(y, wanted, torch.ones_like(y))

    return lambda strategy: functools.partial(call, strategy)


def _natives(groups: int) -> set[Strategy]:
    """The plain grouped conv in the input's memory format and in channels-last."""
    return {Strategy("grouped", groups, cl) for cl in (False, True)}


def _race(calls: dict[Strategy, Callable[[], None]], natives: set[Strategy], device: torch.device, margin: float,
          min_total_ms: float) -> tuple[Strategy, dict[str, list[float]], str]:
    """Time ``calls`` in interleaved rounds until the fastest one's lead over the fastest of ``natives`` is shown
    beyond noise (the 95 % interval of its median per-round ratio below ``1 - margin``: it wins), or shown not
    to be that large (the interval above it), or :data:`MAX_ROUNDS` pass (the native wins).

    Returns:
        ``(winner, {name: ms per round}, evidence in words)``.
    """
    names = {strategy.name: strategy for strategy in calls}
    named = {s.name: call for s, call in calls.items()}
    times = interleaved_times(named, device, rounds=MIN_ROUNDS, min_total_ms=min_total_ms, max_rounds=MAX_ROUNDS)
    while True:
        medians = {name: statistics.median(ms) for name, ms in times.items()}
        plain = min((s for s in natives if s in calls), key=lambda s: medians[s.name])
        fastest = names[min(medians, key=medians.get)]
        if fastest in natives:
            return fastest, times, f"{fastest.name}: the plain grouped conv was fastest ({len(times[fastest.name])} " \
                                   "rounds)"
        ratios = [a / b for a, b in zip(times[fastest.name], times[plain.name])]
        low, high = median_interval(ratios)
        said = f"{fastest.name} {statistics.median(ratios):.3f}x {plain.name} [95 % interval {low:.3f}, " \
               f"{high:.3f}], {len(ratios)} rounds"
        if high < 1 - margin:
            return fastest, times, f"{said}: a lead beyond noise, chosen"
        if low >= 1 - margin or len(ratios) >= MAX_ROUNDS:
            return plain, times, f"{said}: no {margin:.0%} lead beyond noise, the plain grouped conv kept"
        more = interleaved_times(named, device, rounds=4, min_total_ms=0)
        times = {name: times[name] + more[name] for name in times}


def autotune(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: ConvGeometry, grad: bool,
             finalists: int = 3, screen_ms: float = 10.0, final_ms: float | None = None, margin: float = 0.02
             ) -> Tuning:
    """Time the candidates on fresh tensors shaped like these and return the fastest that wins on evidence.

    A screening pass warms each candidate up and keeps its fastest call (timed until the calls add up to
    ``screen_ms``), skipping any whose FLOPs at the device's peak GEMM rate would take longer than the best so
    far, or that fails (out of memory, unsupported); its time is then ``nan``. The ``finalists`` fastest, and the
    plain grouped conv in both memory formats, then race in interleaved rounds (:func:`_race`: at least
    :data:`MIN_ROUNDS`, and more until each one's calls add up to ``final_ms``, and more while the lead of the
    fastest over the plain conv is within noise). Tuning times a strategy warm, in a tight loop; in a network its
    extra small operations (placing kernels block-diagonally, converting memory formats) run with cold caches and
    cost more, so a near tie goes to the native kernel.

    Args:
        x: an input of the shape, dtype, device and memory format to tune for.
        weight: the kernels.
        bias: the bias or ``None``.
        geom: stride, padding, dilation and groups.
        grad: time forward + backward (else forward only).
        finalists: candidates timed again after the screening pass, besides the plain grouped conv.
        screen_ms: time each candidate for about this long in the screening pass.
        final_ms: time each finalist for about this long; ``None``: :func:`tuning_ms`.
        margin: how much faster (a fraction) than the plain grouped conv another strategy must be shown to be.
    """
    device = x.device
    call = _probe(x, weight, bias, geom, grad)
    forward_flops = 2.0 * weight.numel() * x.shape[0] * output_pixels(x, weight, geom)
    peak = peak_gemm_flops(device, x.dtype)
    times: dict[str, float] = {}
    found: dict[Strategy, float] = {}
    for strategy in candidates(x.shape[1], weight.shape[0], tuple(weight.shape[2:]), geom, x.device.type):
        times[strategy.name] = float("nan")
        best = min(found.values(), default=float("inf"))
        if strategy_flops(strategy, geom, forward_flops) * (3 if grad else 1) / peak * 1e3 > best:
            continue
        try:
            found[strategy] = times[strategy.name] = min(call_times(
                call(strategy), device, repeats=1, min_total_ms=screen_ms, give_up_ms=3 * best))
        except (RuntimeError, ValueError):
            continue
    natives = _natives(geom.groups) & found.keys()
    if not natives:
        return Tuning(Strategy("grouped", geom.groups), times, "the plain grouped conv failed to run: kept")
    final = set(sorted(found, key=found.get)[:finalists]) | natives
    winner, rounds, evidence = _race({s: call(s) for s in final}, natives, device, margin,
                                     tuning_ms() if final_ms is None else final_ms)
    times |= {name: statistics.median(ms) for name, ms in rounds.items()}
    return Tuning(winner, times, evidence)


def still_wins(strategy: Strategy, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               geom: ConvGeometry, grad: bool, rounds: int = VALIDATION_ROUNDS) -> bool:
    """Whether ``strategy`` is still at least as fast as the plain grouped conv: a cheap check of a cached choice,
    ``rounds`` interleaved rounds of it and the plain conv in both memory formats, the median per-round ratio to
    the faster of those at most 1."""
    call = _probe(x, weight, bias, geom, grad)
    natives = _natives(geom.groups)
    calls = {s: call(s) for s in natives | {strategy}}
    for warm in calls.values():
        warm()
    times = interleaved_times({s.name: c for s, c in calls.items()}, x.device, rounds=rounds, min_total_ms=0,
                              max_rounds=rounds)
    plain = min(natives, key=lambda s: statistics.median(times[s.name]))
    return statistics.median(a / b for a, b in zip(times[strategy.name], times[plain.name])) <= 1.0


class Tuner:
    """The tuner's state, in one place: the mode, the choices (by call signature and by cache key), the peak
    rates and quiet reference times, the disk cache behind them (read once, when first needed), the choices read
    from disk and not yet checked in this process, and the calls waiting for a quiet machine."""

    def __init__(self) -> None:
        self.mode: str | None = None  # set by conv_strategy(); else the environment's
        self.env_mode: str | None = None
        self.choices: dict[str, Strategy] = {}
        self.by_signature: dict[tuple, Strategy] = {}
        self.peaks: dict[str, float] = {}
        self.disk_loaded = False
        self.unchecked: set[str] = set()  # keys read from disk, not yet checked against the plain conv
        self.retry_at: dict[tuple, float] = {}  # signatures tuned on a busy machine: when to try again
        self.busy_streak: dict[tuple, int] = {}  # signatures: busy findings in a row (each doubles the wait)
        self.quiet_until = 0.0  # time.monotonic() until which the last quiet reading stands in for the probe
        self.used: dict[tuple, Strategy] | None = None  # filled inside recording()

    def current_mode(self) -> str:
        """The mode set by :func:`conv_strategy`, else ``$CONTINUUM_CONV_STRATEGY`` (read when first needed, and
        again after :meth:`forget`), else ``auto``."""
        if self.mode:
            return self.mode
        if self.env_mode is None:
            self.env_mode = env_mode()
        return self.env_mode

    def forget(self) -> None:
        """Drop what is known in memory: choices, peaks, pending retries and checks, and the mode read from the
        environment (the disk cache and ``$CONTINUUM_CONV_STRATEGY`` are read again when next needed)."""
        self.env_mode = None
        self.choices.clear()
        self.by_signature.clear()
        self.peaks.clear()
        self.unchecked.clear()
        self.retry_at.clear()
        self.busy_streak.clear()
        self.quiet_until = 0.0
        self.disk_loaded = False

    @staticmethod
    def cache_path() -> Path:
        """The disk cache: ``conv_strategies.json`` in the cache root."""
        return cache_root() / CACHE_FILE

    def read_disk(self) -> dict[str, str | float]:
        """The disk cache's entries (strategy names, peak rates, quiet reference times); a missing or garbled file
        reads as empty."""
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
        key = f"peak|{torch.__version__}|{machine_key(device)}|{dtype}"
        if key not in self.peaks:
            stored = self.read_disk().get(key)
            valid = isinstance(stored, float) and math.isfinite(stored) and stored > 0
            self.peaks[key] = stored if valid else measure_peak_flops(device, dtype)
            if not valid:
                self.write_disk(key, self.peaks[key])
        return self.peaks[key]

    def busy_reason(self, device: torch.device, load: OtherLoad | None = None) -> str | None:
        """Why the machine is too busy to trust a timing now, or ``None``.

        On a CPU whose system reports CPU time (``load`` measured): other processes (and the hypervisor's steal)
        kept more cores busy than this process's threads leave free. Elsewhere (a GPU, or no ``load``): the
        reference workload (:func:`~continuum.timing.reference_ms`) ran over :data:`BUSY_SLOWDOWN` times its quiet
        time, twice; the quiet time is the fastest ever seen on this machine (kept in the disk cache). On a quiet
        2-core VM the reference alone called the machine busy now and then; the CPU time is the direct evidence.
        """
        if device.type == "cpu" and load is not None and load.other_cores is not None:
            free = (os.cpu_count() or 1) - torch.get_num_threads()
            if load.other_cores > free + 0.25:
                return f"other processes kept {load.other_cores:.1f} cores busy and this process leaves {free} free"
            return None
        key = f"reference|{CACHE_VERSION}|{torch.__version__}|{kernel_library(device.type)}|{machine_key(device)}"
        stored = self.read_disk().get(key)
        quiet = stored if isinstance(stored, float) and math.isfinite(stored) and stored > 0 else math.inf
        now = reference_ms(device)
        if now > BUSY_SLOWDOWN * quiet:  # a slow spell passes; a busy machine stays slow
            time.sleep(0.05)
            now = min(now, reference_ms(device))
        if now < quiet:
            self.write_disk(key, now)
        elif now > BUSY_SLOWDOWN * quiet:
            return f"a reference workload took {now:.2f} ms, {now / quiet:.2f}x its quiet {quiet:.2f} ms"
        return None

    def choose(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: ConvGeometry
               ) -> Strategy:
        """The strategy ``auto`` uses for this call: cached, or autotuned now (and cached in memory and on disk)."""
        grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        signature = call_signature(x, weight, geom, grad)
        strategy = self.by_signature.get(signature)
        if strategy is None or (self.retry_at and time.monotonic() >= self.retry_at.get(signature, math.inf)):
            strategy = self.by_signature[signature] = self._tuned(x, weight, bias, geom, grad, signature)
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

    def _load_disk(self) -> None:
        """Read the disk cache's choices into memory (once), as not yet checked in this process."""
        for stored_key, name in self.read_disk().items():
            try:
                self.choices[stored_key] = Strategy.parse(name)  # a peak (float) or a garbled name is skipped
            except (AttributeError, ValueError):
                continue
            self.unchecked.add(stored_key)
        self.disk_loaded = True

    def _tuned(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: ConvGeometry,
               grad: bool, signature: tuple) -> Strategy:
        """The choice stored under this call's :func:`cache_key` (in memory, or on disk and still winning), or
        autotuned now; the plain grouped conv, for now, when the machine is too busy to tune."""
        key = cache_key(x, weight, geom, grad)
        if key not in self.choices and not self.disk_loaded:
            self._load_disk()
        plain = Strategy("grouped", geom.groups)
        fitting = candidates(x.shape[1], weight.shape[0], tuple(weight.shape[2:]), geom, x.device.type)
        cached = self.choices.get(key)
        if cached in fitting and key in self.unchecked:
            self.unchecked.discard(key)
            if cached != plain and not self._still_wins(cached, x, weight, bias, geom, grad):
                log.info("conv strategy %s cached for %s lost to the plain grouped conv: dropped", cached.name, key)
                self.choices[key] = plain
                self.write_disk(key, plain.name)
        if self.choices.get(key) in fitting:
            self.retry_at.pop(signature, None)
            return self.choices[key]
        for _ in range(TUNING_TRIES):  # a busy spell within the tuning alone: probe again, and tune again if quiet
            busy = self._busy_before(x.device)
            with OtherLoad() as load, torch.no_grad() if not grad else torch.enable_grad():
                tuning = None if busy else autotune(x, weight, bias, geom, grad)
            busy = busy or self.busy_reason(x.device, load)
            self.quiet_until = 0.0 if busy else time.monotonic() + QUIET_TRUSTED_SECONDS
            if tuning is None or not busy:
                break
        if busy:
            streak = self.busy_streak[signature] = self.busy_streak.get(signature, 0) + 1
            wait = min(RETRY_MAX_SECONDS, RETRY_SECONDS * 2 ** (streak - 1))
            (log.debug if self.retry_at else log.warning)(
                "conv strategies not tuned while the machine is busy (%s): the plain grouped conv runs, and tuning "
                "is tried again in %.0f s", busy, wait)
            log.debug("not tuned: %s", key)
            self.retry_at[signature] = time.monotonic() + wait
            return plain
        self.retry_at.pop(signature, None)
        self.busy_streak.pop(signature, None)
        self.choices[key] = tuning.strategy
        log.debug("conv strategy for %s: %s", key, tuning.evidence)
        self.write_disk(key, tuning.strategy.name)
        return tuning.strategy

    def _busy_before(self, device: torch.device) -> str | None:
        """:meth:`busy_reason` before tuning: other processes' CPU use over :data:`PROBE_SECONDS` on a CPU (the
        reference workload where the system does not report it), the reference workload on a GPU; ``None`` at once
        on a CPU found quiet within the last :data:`QUIET_TRUSTED_SECONDS`."""
        if device.type != "cpu":
            return self.busy_reason(device)
        if time.monotonic() < self.quiet_until:
            return None
        with OtherLoad() as probe:
            time.sleep(PROBE_SECONDS)
        return self.busy_reason(device, probe)

    def _still_wins(self, strategy: Strategy, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    geom: ConvGeometry, grad: bool) -> bool:
        """:func:`still_wins`, unless the machine is too busy to tell (then the cached choice stands)."""
        with OtherLoad() as load, torch.no_grad() if not grad else torch.enable_grad():
            wins = still_wins(strategy, x, weight, bias, geom, grad)
        return wins or self.busy_reason(x.device, load) is not None


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


def next_retry_s(signatures: Collection[tuple] | None = None) -> float | None:
    """Seconds until the tuner tries again a conv it found the machine too busy to tune (0 when that is due), or
    ``None`` when no conv waits for it.

    Args:
        signatures: only these calls (:func:`call_signature`, as :meth:`Tuner.recording` gathers them); ``None``:
            every call. A call that will not come again (another model's, or one at another thread count) is
            tuned only when it comes, so waiting for it would never end.
    """
    due = [at for signature, at in TUNER.retry_at.items() if signatures is None or signature in signatures]
    return max(0.0, min(due) - time.monotonic()) if due else None


def forget_choices() -> None:
    """Drop what the tuner knows in memory (see :meth:`Tuner.forget`)."""
    TUNER.forget()


def use_native(x: torch.Tensor) -> bool:
    """Mode ``native``, deterministic algorithms, tensors without data (the ``meta`` device), or tracing:
    ``torch.jit.trace``, ``torch.compile`` / ``export``, or ``torch.fx`` symbolic tracing (which passes a ``Proxy``,
    not a tensor). Compiling is asked first: dynamo reads ``is_compiling()`` as a constant, while the other checks
    broke its graph at every layer (a 2-stage ``continuum_small`` compiled into 21 graphs, not 2)."""
    return torch.compiler.is_compiling() or current_mode() == "native" or not isinstance(x, torch.Tensor) \
        or x.is_meta or torch.are_deterministic_algorithms_enabled() or torch._C._is_tracing()


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
