"""Batch norm's channels-last training pass: continuum's C++ kernel (:class:`continuum.norm.BatchNorm2d`) against
torch's ``nn.BatchNorm2d``, per layer and in a whole training step.

Layers: the forward, and the forward and backward together, of each shape (``CxHxB`` or a name of
``continuum.bench``) and input dtype (``--dtypes``; bf16 is what a conv under autocast hands on, and the layers'
weights stay float32), both layers timed in interleaved rounds (a slow spell of the machine hits both alike); the
speedup is the median of the per-round ratios with its distribution-free 95 % interval. The memory floor is the
tensor passes each must make (forward: read x twice, write y; backward: read x and dy twice, write dx) at the
bandwidth of a copy of the same tensor, timed in the same rounds.

Steps: one SGD step of ``continuum_small`` (fp32 or bf16 autocast, channels-last, tuned convs) on a batch of 28 px
images, the model with continuum's batch norm and the same model with torch's, in interleaved rounds.

    python benchmarks/batch_norm.py --out results/bench/xeon

Prints both tables and writes batch_norm_layers_cpu.csv and batch_norm_step_cpu.csv under --out.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd
import timm
import torch
import torch.nn.functional as F
from torch import nn

import continuum  # noqa: F401
from continuum import keep_freed_memory
from continuum.bench import DTYPES, parse_shapes
from continuum.compiled import batch_norm_kernels
from continuum.config import argument, choice, comma_list, integer
from continuum.files import atomic_write, check_writable_folder
from continuum.knobs import parse_segments
from continuum.norm import BatchNorm2d
from continuum.timing import device_name, interleaved_times, median_interval

PASSES = {"fwd": 3, "fwd+bwd": 8}
"""Tensor-sized memory passes each direction needs at least (a copy makes 2)."""


def with_torchs_norm(model: nn.Module) -> nn.Module:
    """``model`` with each of continuum's batch norms turned into torch's (same parameters and buffers)."""
    for module in model.modules():
        if type(module) is BatchNorm2d:
            module.__class__ = nn.BatchNorm2d
    return model


def speedup(torch_ms: list[float], ours_ms: list[float]) -> dict[str, float]:
    """The median per-round ratio torch / ours, with its 95 % interval."""
    ratios = [theirs / ours for theirs, ours in zip(torch_ms, ours_ms)]
    low, high = median_interval(ratios)
    return {"speedup": statistics.median(ratios), "speedup_low": low, "speedup_high": high}


def layer_rows(shape, precision: str, rounds: int) -> list[dict]:
    """Both directions of one shape with input (and output) in ``precision`` (``fp32`` or ``bf16``; the layers'
    weights float32, as under autocast): median ms of torch's and ours, the floor, and the paired speedup."""
    torch.manual_seed(0)
    x = torch.randn(shape.batch, shape.channels, shape.size, shape.size, dtype=DTYPES[precision])
    x = x.contiguous(memory_format=torch.channels_last)
    upstream = torch.randn_like(x)
    x.requires_grad_(True)
    ours = BatchNorm2d(shape.channels)
    theirs = with_torchs_norm(BatchNorm2d(shape.channels))
    calls = {"copy": lambda: x.detach().clone()}
    for name, layer in (("torch", theirs), ("ours", ours)):
        calls[f"{name} fwd"] = lambda layer=layer: layer(x.detach())
        calls[f"{name} fwd+bwd"] = lambda layer=layer: torch.autograd.grad(layer(x), [x, *layer.parameters()],
                                                                             upstream)
    for call in calls.values():
        call(), call()  # warm: allocator, the kernel's first load
    times = interleaved_times(calls, torch.device("cpu"), rounds, min_total_ms=0.0)
    copy_ms = statistics.median(times["copy"])
    rows = []
    for direction, passes in PASSES.items():
        torch_ms, ours_ms = times[f"torch {direction}"], times[f"ours {direction}"]
        floor_ms = copy_ms * passes / 2
        rows.append({"shape": shape.name, "channels": shape.channels, "size": shape.size, "batch": shape.batch,
                     "dtype": precision, "direction": direction, "torch_ms": statistics.median(torch_ms),
                     "ours_ms": statistics.median(ours_ms), "floor_ms": floor_ms,
                     "torch_over_floor": statistics.median(torch_ms) / floor_ms,
                     "ours_over_floor": statistics.median(ours_ms) / floor_ms, **speedup(torch_ms, ours_ms),
                     "rounds": len(ours_ms)})
    return rows


def step_row(segments, precision: str, batch: int, rounds: int) -> dict:
    """Images/s of a training step (in ``precision``: ``bf16`` is autocast) with each batch norm, and the paired
    speedup."""
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    steps = {}
    for name in ("torch", "ours"):
        torch.manual_seed(0)
        model = timm.create_model("continuum_small", segments=segments).to(memory_format=torch.channels_last)
        model = with_torchs_norm(model) if name == "torch" else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

        def step(model=model, optimizer=optimizer) -> None:
            with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step(), step()  # warm (and the convs tuned)
        steps[name] = step
    times = interleaved_times(steps, torch.device("cpu"), rounds, min_total_ms=0.0)
    throughput = {f"{name}_images_per_s": batch * 1e3 / statistics.median(ms) for name, ms in times.items()}
    return {"segments": str(segments), "dtype": precision, **throughput, **speedup(times["torch"], times["ours"]),
            "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="32x28x128,64x28x128,128x14x128,256x7x128",
                        help="CxHxB list (default: continuum_small's batch norms on Fashion-MNIST)")
    parser.add_argument("--segments", default="1,16,all", help="segment counts of the step table (default: 1,16,all)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (default: both)")
    parser.add_argument("--batch", type=argument(integer(2)), default=128, help="the step's batch (default: 128)")
    parser.add_argument("--rounds", type=argument(integer(1)), default=20, help="paired rounds (default: 20)")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args()
    try:
        shapes = parse_shapes(args.shapes)
        segments = comma_list("--segments", parse_segments, "1,16,all")(args.segments)
        precisions = comma_list("--dtypes", choice(tuple(DTYPES)), "fp32,bf16", named=True)(args.dtypes)
        check_writable_folder(Path(args.out), "--out")
    except ValueError as err:
        parser.error(str(err))
    if batch_norm_kernels() is None:
        parser.error("the C++ batch norm cannot be built here (no compiler?): there is nothing to compare")
    keep_freed_memory()
    device = device_name(torch.device("cpu"))
    layers = [row for precision in precisions for shape in shapes for row in layer_rows(shape, precision, args.rounds)]
    steps = [step_row(count, precision, args.batch, args.rounds) for precision in precisions for count in segments]
    tables = {"batch_norm_layers_cpu.csv": pd.DataFrame(layers), "batch_norm_step_cpu.csv": pd.DataFrame(steps)}
    for name, table in tables.items():
        table["device"], table["threads"], table["torch"] = device, torch.get_num_threads(), torch.__version__
        out = Path(args.out) / name
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda path, table=table: table.to_csv(path, index=False))
        print(table.drop(columns=["device", "torch"]).to_markdown(index=False, floatfmt=".3g"))
        print(f"table: {out}\n")


if __name__ == "__main__":
    main()
