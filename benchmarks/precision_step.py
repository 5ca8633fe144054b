"""Training-step throughput by precision and memory format: fp32 vs bf16 autocast, NCHW vs channels-last.

One SGD step of ``continuum_small`` on a batch of 28 px images, each kind of step timed once per round in turn
(paired rounds: a slow spell of the machine hits every kind alike), medians over rounds. Segmented convs run
natively (``conv_strategy("native")``), so that no kind waits for the tuner. This is what ``--precision auto``
decides from: bf16 only where the hardware computes it natively.

    python benchmarks/precision_step.py                       # CPU; results/bench/precision_step_cpu.csv
    python benchmarks/precision_step.py --device cuda --segments 1,4,16,all

Prints a table and writes results/bench/precision_step_<device>.csv.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd
import timm
import torch
import torch.nn.functional as F

import continuum  # noqa: F401
from continuum import conv_strategy, keep_freed_memory
from continuum.files import atomic_write
from continuum.knobs import parse_segments
from continuum.timing import cpu_flags, device_name
from continuum.train import resolve_device

KINDS = {"fp32_nchw": (torch.float32, False), "fp32_cl": (torch.float32, True), "bf16_cl": (torch.bfloat16, True)}
"""Name: (autocast dtype, channels-last)."""


def step_images_per_s(segments, device: torch.device, batch: int, rounds: int) -> dict[str, float]:
    """Median images/s of one training step per kind, over ``rounds`` paired rounds (after two warm-up steps)."""
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    steps = {}
    for name, (dtype, channels_last) in KINDS.items():
        torch.manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = timm.create_model("continuum_small", segments=segments).to(device, memory_format=fmt)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        inputs = x.contiguous(memory_format=fmt)

        def step(model=model, optimizer=optimizer, inputs=inputs, dtype=dtype) -> None:
            with conv_strategy("native"), torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                loss = F.cross_entropy(model(inputs).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        step(), step()
        steps[name] = step
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - start)
    return {name: batch / statistics.median(s) for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--segments", default="4,all", help="segment counts (default: 4,all)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args()
    keep_freed_memory()
    device = resolve_device(args.device)
    bf16_native = bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) if device.type == "cpu" else True
    rows = []
    for text in args.segments.split(","):
        speeds = step_images_per_s(parse_segments(text), device, args.batch, args.rounds)
        rows.append({"segments": text, **{f"{k}_images_per_s": v for k, v in speeds.items()},
                     "cl_over_nchw": speeds["fp32_cl"] / speeds["fp32_nchw"],
                     "bf16_over_fp32": speeds["bf16_cl"] / speeds["fp32_cl"],
                     "device": device_name(device), "native_bf16": bf16_native, "torch": torch.__version__})
        print(f"  segments={text}: done", flush=True)
    table = pd.DataFrame(rows)
    out = Path(args.out) / f"precision_step_{device.type}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda path: table.to_csv(path, index=False))
    print(table.to_markdown(index=False, floatfmt=".3g"))
    print(f"table: {out}")


if __name__ == "__main__":
    main()
