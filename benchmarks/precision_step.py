"""Training-step throughput by precision, memory format and conv tuner: fp32 vs bf16 autocast, NCHW vs
channels-last, native segmented convs vs the tuner's choices.

One SGD step of ``continuum_small`` on a batch of 28 px images, each kind of step timed once per round in turn
(paired rounds: a slow spell of the machine hits every kind alike). Throughputs are medians over rounds; each ratio
is the median of the per-round ratios with its distribution-free 95 % interval, so that a difference of a few
percent can be told from this machine's step-to-step noise. Segmented convs run natively
(``conv_strategy("native")``) except in ``fp32_cl_tuned``, which runs what the tuner chooses (tuned during the
warm-up steps, or read from its cache): ``tuned_over_native`` is the tuner's effect in a whole model. The bf16 kind
is what ``--precision auto`` decides from: bf16 only where the hardware computes it natively.

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
from continuum.config import argument, comma_list, integer
from continuum.files import atomic_write, check_writable_folder
from continuum.knobs import parse_segments
from continuum.timing import cpu_flags, device_name, median_interval
from continuum.train import resolve_device

KINDS = {"fp32_nchw": (torch.float32, False, "native"), "fp32_cl": (torch.float32, True, "native"),
         "fp32_cl_tuned": (torch.float32, True, "auto"), "bf16_cl": (torch.bfloat16, True, "native")}
"""Name: (autocast dtype, channels-last, conv strategy mode)."""

RATIOS = {"cl_over_nchw": ("fp32_cl", "fp32_nchw"), "tuned_over_native": ("fp32_cl_tuned", "fp32_cl"),
          "bf16_over_fp32": ("bf16_cl", "fp32_cl")}
"""Column: (faster kind, slower kind), as a ratio of throughputs."""


def step_seconds(segments, device: torch.device, batch: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of one training step per kind and round, in ``rounds`` paired rounds (after two warm-up steps)."""
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    steps = {}
    for name, (dtype, channels_last, mode) in KINDS.items():
        torch.manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = timm.create_model("continuum_small", segments=segments).to(device, memory_format=fmt)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        inputs = x.contiguous(memory_format=fmt)

        def step(model=model, optimizer=optimizer, inputs=inputs, dtype=dtype, mode=mode) -> None:
            with conv_strategy(mode), torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                loss = F.cross_entropy(model(inputs).float(), y)  # the backward runs the forward's strategies
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
    return seconds


def summary_row(seconds: dict[str, list[float]], batch: int) -> dict[str, float]:
    """Median images/s per kind, and per :data:`RATIOS` column the median paired ratio with its 95 % interval."""
    row = {f"{name}_images_per_s": batch / statistics.median(s) for name, s in seconds.items()}
    for column, (faster, slower) in RATIOS.items():
        ratios = [slow / fast for fast, slow in zip(seconds[faster], seconds[slower])]  # throughput ratio
        row[column] = statistics.median(ratios)
        row[f"{column}_low"], row[f"{column}_high"] = median_interval(ratios)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", type=argument(resolve_device))
    parser.add_argument("--segments", default="4,all", help="segment counts (default: 4,all)")
    parser.add_argument("--batch", type=argument(integer(1)), default=128)
    parser.add_argument("--rounds", type=argument(integer(1)), default=40, help="paired rounds (default: 40)")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args()
    try:
        segments = comma_list("--segments", parse_segments, "4,all")(args.segments)
        check_writable_folder(Path(args.out), "--out")
    except ValueError as err:
        parser.error(str(err))
    keep_freed_memory()
    device: torch.device = args.device
    bf16_native = bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) if device.type == "cpu" else True
    rows = []
    for count in segments:
        seconds = step_seconds(count, device, args.batch, args.rounds)
        rows.append({"segments": str(count), **summary_row(seconds, args.batch), "rounds": args.rounds,
                     "device": device_name(device), "native_bf16": bf16_native, "torch": torch.__version__})
        print(f"  segments={count}: done", flush=True)
    table = pd.DataFrame(rows)
    out = Path(args.out) / f"precision_step_{device.type}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda path: table.to_csv(path, index=False))
    print(table.to_markdown(index=False, floatfmt=".3g"))
    print(f"table: {out}")


if __name__ == "__main__":
    main()
