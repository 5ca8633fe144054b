"""How a segmented convolution is computed: equivalent strategies, the fastest autotuned once per shape and cached.

A convolution with ``G`` even segments (``groups=G``) can be computed many ways that give the same numbers up to
float rounding:

- ``grouped/g``: a native grouped ``conv2d`` with ``g`` groups, ``g`` any divisor of ``G``. ``g = G`` is the plain
  grouped conv; ``g < G`` embeds the kernels block-diagonally into fewer, larger groups (``g = 1``: a dense conv
  with zeros off the diagonal). More FLOPs, but dense kernels are often much faster than grouped ones.
- ``grouped/g+cl``: the same in channels-last memory format (converted back afterwards).
- ``unfold``: im2col (``F.unfold``) and one batched matrix product per segment.
- ``shifted``: depthwise only (one input and one output channel per segment): the sum of ``k*k`` shifted copies
  of the input, each scaled per channel.

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
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import random
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F

MODES = ("auto", "native")
"""Strategy modes: autotune per shape, or always the plain grouped conv."""

_mode: str | None = None
_env_mode: str | None = None
_choices: dict[str, Strategy] = {}
_by_signature: dict[tuple, Strategy] = {}
_peaks: dict[str, float] = {}
_disk_loaded = False


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"conv strategy mode {mode!r} is not valid; choose one of {', '.join(MODES)} "
                         "(set CONTINUUM_CONV_STRATEGY or continuum.strategy.conv_strategy)")
    return mode


def current_mode() -> str:
    """The strategy mode in force: set by :func:`conv_strategy`, else ``$CONTINUUM_CONV_STRATEGY`` (read when first
    needed, and again after :func:`forget_choices`), else ``auto``."""
    global _env_mode
    if _mode:
        return _mode
    if _env_mode is None:
        _env_mode = _check_mode(os.environ.get("CONTINUUM_CONV_STRATEGY", "auto").strip().lower() or "auto")
    return _env_mode


@contextmanager
def conv_strategy(mode: str) -> Iterator[None]:
    """Run segmented convolutions in ``mode`` (``"auto"`` or ``"native"``) inside the ``with`` block.

    Args:
        mode: ``"auto"`` (fastest equivalent strategy, autotuned) or ``"native"`` (plain grouped conv).
    """
    global _mode
    previous, _mode = _mode, _check_mode(mode)
    try:
        yield
    finally:
        _mode = previous


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
        kind: ``"grouped"``, ``"unfold"`` or ``"shifted"``.
        groups: the groups a ``grouped`` strategy runs with (a divisor of the segments).
        channels_last: compute in channels-last memory format.
    """

    kind: str
    groups: int = 0
    channels_last: bool = False

    @property
    def name(self) -> str:
        """``grouped/4``, ``grouped/4+cl``, ``unfold`` or ``shifted``."""
        base = f"grouped/{self.groups}" if self.kind == "grouped" else self.kind
        return base + ("+cl" if self.channels_last else "")

    @classmethod
    def parse(cls, name: str) -> Strategy:
        """The strategy called ``name`` (see :attr:`name`)."""
        base, _, suffix = name.partition("+")
        kind, _, groups = base.partition("/")
        return cls(kind, int(groups) if groups else 0, suffix == "cl")


def _is_channels_last(x: torch.Tensor) -> bool:
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


def _output_pixels(x: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry) -> int:
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
    channels_last_input = _is_channels_last(x)
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
        y = (_unfold_conv if strategy.kind == "unfold" else _shifted_conv)(x, weight, bias, geom, padding)
    return y.contiguous(memory_format=torch.channels_last if channels_last_input else torch.contiguous_format)


def candidates(in_channels: int, out_channels: int, kernel: tuple[int, int], geom: ConvGeometry) -> list[Strategy]:
    """Every strategy that can compute this convolution, fewest FLOPs first.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel: ``(kh, kw)``.
        geom: stride, padding, dilation and groups.
    """
    divisors = [g for g in range(geom.groups, 0, -1) if geom.groups % g == 0]
    found = [Strategy("grouped", g, cl) for g in divisors for cl in (False, True)]
    if geom.numeric_padding(kernel) is not None:
        if geom.groups > 1:
            found.insert(2, Strategy("unfold"))
        if geom.groups == in_channels == out_channels:
            found.insert(2, Strategy("shifted"))
    return found


def strategy_flops(strategy: Strategy, geom: ConvGeometry, forward_flops: float) -> float:
    """FLOPs a strategy performs, given the segmented conv's own ``forward_flops``."""
    return forward_flops * (geom.groups / strategy.groups if strategy.kind == "grouped" else 1)


# ----------------------------------------------------------------------------------------------------- measuring

def device_name(device: torch.device) -> str:
    """What a timing depends on: the CPU model and thread count, or the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} x{torch.get_num_threads()} threads"


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
                      min_total_ms: float, max_rounds: int = 50, contexts: Sequence[Sequence[str]] = ()
                      ) -> dict[str, list[float]]:
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

    Returns:
        ``{column name: one time per round}``.
    """
    grouped = {name for group in contexts for name in group}
    rest = [name for name in calls if name not in grouped]
    blocks = [list(group) for group in contexts if group] + ([rest] if rest else [])
    times: dict[str, list[float]] = {name: [] for name in calls}
    rng = random.Random(0)
    done = 0
    while done < rounds or (min(map(sum, times.values())) < min_total_ms and done < max_rounds):
        rng.shuffle(blocks)
        for block in blocks:
            if contexts:
                calls[rng.choice(block)]()  # untimed: sets the context; any member, so that none is favoured
            for name in rng.sample(block, len(block)):
                times[name] += call_times(calls[name], device, repeats=1, warmup=0)
        done += 1
    return times


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


def peak_gemm_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The peak FLOP/s autotuning bounds candidates with: measured once per machine and cached."""
    key = f"peak|{torch.__version__}|{device_name(device)}|{dtype}"
    if key not in _peaks:
        stored = _load_disk_cache().get(key)
        _peaks[key] = stored if isinstance(stored, float) else measure_peak_flops(device, dtype)
        if stored is None:
            _save(key, _peaks[key])
    return _peaks[key]


def _cache_path() -> Path:
    return Path(os.environ.get("CONTINUUM_CACHE") or Path.home() / ".cache" / "continuum") / "conv_strategies.json"


def _load_disk_cache() -> dict[str, str | float]:
    try:
        stored = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in stored.items() if isinstance(v, (str, float))} if isinstance(stored, dict) else {}


def _save(key: str, value: str | float) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = _load_disk_cache() | {key: value}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache folder only costs a re-tune in the next process


def cache_key(x: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, grad: bool) -> str:
    """The autotuning cache key: device, dtype (and autocast), memory formats of input and kernels, shapes,
    geometry and whether a gradient is wanted."""
    layout = "/".join("cl" if t.dim() == 4 and _is_channels_last(t) else "nchw" for t in (x, weight))
    return "|".join(str(part) for part in (
        torch.__version__, device_name(x.device), dtype_name(x.dtype),
        f"autocast {torch.get_autocast_dtype(x.device.type)}" if torch.is_autocast_enabled(x.device.type) else "",
        layout, tuple(x.shape),
        tuple(weight.shape), geom.stride, geom.padding, geom.dilation, geom.groups, "fwd+bwd" if grad else "fwd"))


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
    forward_flops = 2.0 * weight.numel() * x.shape[0] * _output_pixels(x, weight, geom)
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


def _use_native(x: torch.Tensor) -> bool:
    """Mode ``native``, deterministic algorithms, or tracing: ``torch.jit.trace``, ``torch.compile`` / ``export``,
    or ``torch.fx`` symbolic tracing (which passes a ``Proxy``, not a tensor)."""
    return current_mode() == "native" or not isinstance(x, torch.Tensor) \
        or torch.are_deterministic_algorithms_enabled() or torch._C._is_tracing() or torch.compiler.is_compiling()


def _call_signature(x: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, grad: bool) -> tuple:
    """What :func:`cache_key` depends on within one process, as a tuple of values torch has at hand: the in-memory
    lookup of every call. It has to be cheap: right after a large convolution the interpreter's caches are cold,
    and building the string key then took 50 us, 3-5 % of a 1-2 ms depthwise conv. Strides stand for the memory
    formats."""
    autocast = torch._C._is_any_autocast_enabled() and (
        torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type))
    return (x.shape, x.stride(), x.dtype, x.device, autocast, weight.shape, weight.stride(), geom, grad,
            torch.get_num_threads())


def chosen_strategy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: ConvGeometry
                    ) -> Strategy:
    """The strategy ``auto`` uses for this call: cached, or autotuned now (and cached in memory and on disk)."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    signature = _call_signature(x, weight, geom, grad)
    strategy = _by_signature.get(signature)
    if strategy is None:
        strategy = _by_signature[signature] = _tuned_strategy(x, weight, bias, geom, grad)
    return strategy


def _tuned_strategy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geom: ConvGeometry,
                    grad: bool) -> Strategy:
    """The choice stored under this call's :func:`cache_key` (in memory or on disk), or autotuned now and stored."""
    global _disk_loaded
    key = cache_key(x, weight, geom, grad)
    if key not in _choices and not _disk_loaded:
        for stored_key, name in _load_disk_cache().items():
            try:
                _choices[stored_key] = Strategy.parse(name)  # a peak (float) or a garbled name is skipped
            except (AttributeError, ValueError):
                continue
        _disk_loaded = True
    if key not in _choices:
        with torch.no_grad() if not grad else torch.enable_grad():
            strategy, _ = autotune(x, weight, bias, geom, grad)
        _choices[key] = strategy
        _save(key, strategy.name)
    return _choices[key]


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
    if _use_native(x):
        return F.conv2d(x, weight, bias, geom.stride, geom.padding, geom.dilation, geom.groups)
    return run_strategy(chosen_strategy(x, weight, bias, geom), x, weight, bias, geom)


def forget_choices() -> None:
    """Drop the in-memory choices and peaks, and the mode read from the environment (the disk cache and
    ``$CONTINUUM_CONV_STRATEGY`` are read again when next needed)."""
    global _disk_loaded, _env_mode
    _env_mode = None
    _choices.clear()
    _by_signature.clear()
    _peaks.clear()
    _disk_loaded = False
