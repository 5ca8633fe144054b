"""The C++ conv kernels of another revision against this checkout's, pass by pass, on a channels-last float32 3x3
conv: at 2-16 channels per group the few-channel kernels (``continuum/csrc/few_channel.cpp``: the forward pass, the
input gradient, a forward pass over the output gradient with the flipped taps, and the kernel gradient), at 1
(depthwise) the ``fused`` kernels (``continuum/csrc/depthwise.cpp``: the forward pass and the backward pass, both
gradients in one sweep). Both builds are timed in interleaved rounds in one process (a slow spell of the machine
hits both alike), on the same tensors. The speedup is the median of the per-round ratios (the other revision's time
over this checkout's) with its 95 % bootstrap interval.

    python benchmarks/kernel_revisions.py --base 9d9da8a --shapes 96x28x64 --widths 2,3,4,8,12,16
    python benchmarks/kernel_revisions.py --base e9b453b --shapes 96x28x64,small_128 --widths 1

Prints the table and writes kernel_revisions_cpu.csv under --out. Needs git and a compiler (a build takes one to two
minutes, once per revision and machine).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pandas as pd
import torch

from continuum import keep_freed_memory
from continuum.bench import Shape, paired_ratio, parse_shapes
from continuum.compiled import BROADCAST_WIDTHS, FEW_CHANNEL_WIDTHS, SOURCES, built, depthwise_kernels, \
    few_channel_kernels
from continuum.config import argument, comma_list, integer
from continuum.files import atomic_write, check_writable_folder
from continuum.kernels import FEW_CHANNEL_KERNELS, flipped_transpose
from continuum.timing import device_name, interleaved_times


def revision_sources(revision: str) -> Path:
    """``continuum/csrc`` as it is at ``revision`` (a commit, tag or branch of this checkout), written into a folder
    named by the commit under the system's temporary folder (the same folder each time: the build's name holds the
    source's path, so a revision built once loads in a second after that); returns the folder."""
    def git(*command: str) -> bytes:
        done = subprocess.run(["git", *command], cwd=SOURCES.parents[1], capture_output=True)  # the checkout
        if done.returncode != 0:
            raise ValueError(f"--base {revision}: {done.stderr.decode().strip() or 'not a revision of this checkout'}")
        return done.stdout

    commit = git("rev-parse", "--verify", f"{revision}^{{commit}}").decode().strip()
    folder = Path(tempfile.gettempdir()) / f"continuum-csrc-{commit[:12]}"
    with tarfile.open(fileobj=io.BytesIO(git("archive", f"{commit}:continuum/csrc"))) as tar:
        tar.extractall(folder, filter="data")
    return folder


def source(k: int) -> str:
    """The C++ source whose kernels run ``k`` channels per group."""
    return "depthwise" if k == 1 else "few_channel"


def pass_calls(module: ModuleType, shape: Shape, k: int, seed: int) -> dict[str, Callable[[], object]]:
    """The passes of ``module``'s kernel for ``k`` channels per group on ``shape`` (tensors from ``seed``):
    ``module`` is the build of :func:`source` of ``k``."""
    generator = torch.Generator().manual_seed(seed)
    x, grad_y = (torch.randn(shape.batch, shape.channels, shape.size, shape.size, generator=generator)
                 .contiguous(memory_format=torch.channels_last) for _ in range(2))
    weight = torch.randn(shape.channels, k, 3, 3, generator=generator)
    if k == 1:
        one = [1, 1]
        return {"forward": lambda: module.forward(x, weight, None, one, one, one),
                "backward": lambda: module.backward(grad_y, x, weight, one, one, one)}
    kernel = FEW_CHANNEL_KERNELS["rotated" if k in FEW_CHANNEL_WIDTHS else "broadcast"]
    forward, taps_gradient = getattr(module, kernel.forward), getattr(module, kernel.taps_gradient)
    taps, flipped, one = kernel.taps(weight), kernel.taps(flipped_transpose(weight)), [1, 1]
    return {"forward": lambda: forward(x, taps, one, one, one),
            "input_grad": lambda: forward(grad_y, flipped, one, one, one),
            "kernel_grad": lambda: taps_gradient(grad_y, x, 3, 3, k, one, one, one)}


def rows_for(shape: Shape, k: int, builds: dict[str, dict[str, ModuleType]], rounds: int, min_total_ms: float
             ) -> list[dict]:
    """One row per pass: both builds' median ms and the speedup of this checkout's over the other (``builds``:
    ``{"base" or "head": {source name: module}}``)."""
    passes = {name: pass_calls(modules[source(k)], shape, k, seed=k) for name, modules in builds.items()}
    calls = {f"{name}/{part}": call for name, parts in passes.items() for part, call in parts.items()}
    for call in calls.values():
        call()  # warm: the allocator, the caches
    times = interleaved_times(calls, torch.device("cpu"), rounds=rounds, min_total_ms=min_total_ms)
    rows = []
    for part in passes["head"]:
        base, head = times[f"base/{part}"], times[f"head/{part}"]
        speedup, low, high = paired_ratio(base, head)
        rows.append({"shape": shape.name, "channels_per_group": k, "pass": part,
                     "base_ms": float(pd.Series(base).median()), "head_ms": float(pd.Series(head).median()),
                     "speedup": speedup, "speedup_low": low, "speedup_high": high, "rounds": len(base)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision to compare with (a commit, tag or branch)")
    parser.add_argument("--shapes", default="96x28x64",
                        help="CxHxB list or names of continuum.bench (default: 96x28x64)")
    parser.add_argument("--widths", default="2,3,4,8,12,16",
                        help=f"channels per group, 1 (depthwise) to {BROADCAST_WIDTHS.stop - 1} "
                             "(default: 2,3,4,8,12,16)")
    parser.add_argument("--rounds", type=argument(integer(3)), default=15, help="paired rounds at least (default: 15)")
    parser.add_argument("--min-ms", type=argument(integer(1)), default=200,
                        help="go on until each call's timed calls add up to this (default: 200)")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args()
    widths_allowed = range(1, BROADCAST_WIDTHS.stop)
    try:
        shapes = parse_shapes(args.shapes)
        widths = comma_list("--widths", integer(widths_allowed.start, widths_allowed.stop - 1), "2,3,4,8,12,16",
                            named=True)(args.widths)
        check_writable_folder(Path(args.out), "--out")
    except ValueError as err:
        parser.error(str(err))
    pairs = [(shape, k) for shape in shapes for k in widths if shape.channels % k == 0]
    if not pairs:
        parser.error("--widths: none divides the channels of --shapes; give widths that do, such as 2,4 for 96x28x64")
    sources = {source(k) for _, k in pairs}
    head = {name: {"depthwise": depthwise_kernels, "few_channel": few_channel_kernels}[name]() for name in sources}
    if "few_channel" in head and head["few_channel"] is None:
        parser.error("the few-channel kernels cannot be built here (no compiler, or neither AVX-512 nor AVX2)")
    if "depthwise" in head and head["depthwise"] is None:
        parser.error("the depthwise kernels cannot be built here (no compiler)")
    keep_freed_memory()
    try:
        base = {name: built(name, revision_sources(args.base)) for name in sources}
    except ValueError as err:
        parser.error(str(err))
    if "few_channel" in base and (base["few_channel"] is None or not all(
            hasattr(base["few_channel"], name) for kernel in FEW_CHANNEL_KERNELS.values()
            for name in (kernel.forward, kernel.taps_gradient))):
        parser.error(f"--base {args.base}: its few_channel.cpp does not build here with both kernels; "
                     "give a revision from 2026-12-03 on")
    if "depthwise" in base and (base["depthwise"] is None or not hasattr(base["depthwise"], "forward")):
        parser.error(f"--base {args.base}: its depthwise.cpp does not build here with a forward pass; give a "
                     "revision from 2026-12-03 on")
    rows = [row for shape, k in pairs for row in rows_for(shape, k, {"base": base, "head": head}, args.rounds,
                                                         args.min_ms)]
    table = pd.DataFrame(rows)
    table["base"], table["device"] = args.base, device_name(torch.device("cpu"))
    table["threads"] = torch.get_num_threads()
    out = Path(args.out) / "kernel_revisions_cpu.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda path: table.to_csv(path, index=False))
    print(table.drop(columns=["device"]).to_markdown(index=False, floatfmt=".3g"))
    print(f"table: {out}")


if __name__ == "__main__":
    main()
