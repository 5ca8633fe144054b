"""The C++ kernels in ``continuum/csrc``, built on first use with the machine's compiler, or ``None`` without one.

:func:`depthwise_kernels` builds ``depthwise.cpp`` (the fused backward pass of a channels-last depthwise conv),
:func:`few_channel_kernels` ``few_channel.cpp`` (a grouped conv of :data:`FEW_CHANNEL_WIDTHS` or
:data:`BROADCAST_WIDTHS` channels per group, CPUs with AVX-512 or AVX2 only) and :func:`batch_norm_kernels`
``batch_norm.cpp`` (batch norm's channels-last training pass) with ``torch.utils.cpp_extension`` the first time a
process asks for one: about half a minute each, the few-channel kernel one to two minutes (they include ATen and
pybind11's tensor casts, not ``torch/extension.h``, which doubles that), once per machine, CPU model, torch install
and checkout (in torch's extensions folder, ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``); later
processes load the built library in a second.
:func:`build_all` builds every one of them at once, side by side.
Where it cannot be built (no compiler, no ``ninja``, a compile error) or ``$CONTINUUM_BUILD_KERNELS`` is ``0``, it
is ``None`` and the strategies that need it are not candidates: everything still runs, on torch's own kernels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import torch

from continuum.files import BUILD_KERNELS, env_switch
from continuum.timing import cpu_flags, cpu_flags_digest, cpu_model

SOURCES = Path(__file__).parent / "csrc"
"""Where the C++ sources are."""

FEW_CHANNEL_WIDTHS = range(2, 8)
"""Channels per group ``few_channel.cpp``'s rotated kernel computes (its ``MIN_GROUP`` and ``MAX_GROUP``): 2 to 7 ran
1.03-2.5x as fast as oneDNN's grouped kernels on the Xeon VM; 8 no faster, 9 to 16 (one group in 16 float lanes)
1.5-4x slower: :data:`BROADCAST_WIDTHS` takes those."""

BROADCAST_WIDTHS = range(8, 17)
"""Channels per group ``few_channel.cpp``'s broadcast kernel computes (its ``MIN_BROADCAST`` and ``MAX_BROADCAST``): one
group per vector register (two with AVX2 past 8), where the rotated kernel's sums no longer fit in the registers."""

DEFINES = {"few_channel": {"MIN_GROUP": FEW_CHANNEL_WIDTHS.start, "MAX_GROUP": FEW_CHANNEL_WIDTHS.stop - 1,
                           "MIN_BROADCAST": BROADCAST_WIDTHS.start, "MAX_BROADCAST": BROADCAST_WIDTHS.stop - 1}}
"""The macros each source is built with."""

log = logging.getLogger(__name__)


def building_allowed() -> bool:
    """``$CONTINUUM_BUILD_KERNELS`` is on (:func:`~continuum.files.env_switch`; unset: on)."""
    return env_switch(BUILD_KERNELS)


@functools.lru_cache(maxsize=None)
def _cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported on first use (it is slow to import, and only building needs it)."""
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)  # its import warns that no CUDA runtime is found: true, and beside the point
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(level)
    return cpp_extension


@functools.lru_cache(maxsize=None)
def built(name: str, sources: Path = SOURCES) -> ModuleType | None:
    """``csrc/NAME.cpp`` built (or loaded from an earlier build), or ``None`` where it cannot be built here. Built
    with ``-O3 -march=native`` under a name holding a hash of torch's version, the CPU model and feature flags and
    the source (a library built for one CPU may not run on another), and of what torch writes into the build's
    command: the source's path, torch's install (its headers and libraries) and the compiler. Two checkouts or
    environments sharing the extensions folder each keep their own build; under one name, each would rewrite the
    other's build file and rebuild it (minutes) whenever the other had run.

    Args:
        name: the source's name, without ``.cpp``.
        sources: the folder holding it and the headers it includes (another revision's ``csrc``, to time two builds
            side by side: ``benchmarks/kernel_revisions.py``).
    """
    if not building_allowed():
        return None
    cpp_extension = _cpp_extension()
    source = sources / f"{name}.cpp"
    headers = b"".join(header.read_bytes() for header in sorted(sources.glob("*.h")))  # what the sources include
    defines = [f"-D{macro}={value}" for macro, value in DEFINES.get(name, {}).items()]
    command = f"{source.resolve()}|{Path(torch.__file__).resolve().parent}|{cpp_extension.get_cxx_compiler()}"
    machine = f"{torch.__version__}|{cpu_model()}|{cpu_flags_digest()}|{defines}|{command}"
    build = hashlib.sha1(machine.encode() + source.read_bytes() + headers).hexdigest()[:12]
    try:
        return cpp_extension.load(f"continuum_{name}_{build}", [str(source)],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp", *defines],
                                  extra_ldflags=["-fopenmp"])
    except Exception as err:  # no compiler, no ninja, a compile or link error: torch's kernels do the work
        log.warning("the C++ kernel %s.cpp could not be built (%s); using torch's kernels", name,
                    str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__)
        return None


def batch_norm_kernels() -> ModuleType | None:
    """``batch_norm.cpp`` built: ``forward(x, weight, bias, eps)`` and ``backward(grad_y, x, weight, mean, invstd,
    input_grad, weight_grad)``, batch norm's channels-last training pass, or ``None``."""
    return built("batch_norm")


def depthwise_kernels() -> ModuleType | None:
    """``depthwise.cpp`` built: ``backward(grad_y, x, weight, stride, padding, dilation)``, or ``None``."""
    return built("depthwise")


def few_channel_cpu() -> bool:
    """The CPU has the vector instructions ``few_channel.cpp`` is written for: AVX-512, or AVX2 with FMA."""
    flags = cpu_flags()
    return "avx512f" in flags or {"avx2", "fma"} <= flags


def few_channel_kernels() -> ModuleType | None:
    """``few_channel.cpp`` built (``forward(x, taps, stride, padding, dilation)`` and ``taps_gradient(grad_y, x,
    kh, kw, k, stride, padding, dilation)``, the rotated kernel; ``broadcast_forward`` and
    ``broadcast_taps_gradient`` alike, the broadcast kernel), or ``None`` where it cannot be built or the CPU lacks
    the instructions (:func:`few_channel_cpu`)."""
    if not few_channel_cpu():  # not worth a minute's build
        return None
    module = built("few_channel")
    return module if module is not None and module.available else None


def build_all() -> list[ModuleType | None]:
    """Every kernel this machine can use (:func:`batch_norm_kernels`, :func:`depthwise_kernels`,
    :func:`few_channel_kernels`), built side by side (each build compiles one file on one core), or ``None`` for
    each that cannot be built; those built before load in a second."""
    getters = [batch_norm_kernels, depthwise_kernels, few_channel_kernels]
    if building_allowed():
        _cpp_extension()  # imported once, before the threads
    with ThreadPoolExecutor(len(getters)) as pool:
        return list(pool.map(lambda get: get(), getters))
