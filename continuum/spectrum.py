"""What the segments knob costs, at a glance: segments -> parameters, multiply-adds, measured latency.

Examples::

    python -m continuum.spectrum                                  # small net, 28 px, segments 1..32, all
    python -m continuum.spectrum --order pointwise_first --backward
    python -m continuum.spectrum --model continuum_xception --segments 1,2,4,8,all --batch-size 1 \\
        --compare continuum_inception_v3
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd
import timm
import torch

import continuum.models  # noqa: F401  (registers the models with timm)
from continuum.allocator import keep_freed_memory
from continuum.config import checked, comma_items, comma_list, integer, optional
from continuum.cost import measure_latency, model_cost
from continuum.files import atomic_write, check_writable_folder
from continuum.knobs import SegmentError, parse_order, parse_segments
from continuum.strategy import check_environment, conv_strategy
from continuum.timing import device_name
from continuum.train import resolve_device

log = logging.getLogger(__name__)

COLUMNS = ["model", "segments", "order", "params", "macs", "latency_ms", "latency_q1_ms", "latency_q3_ms",
           "other_load", "params_vs_dense", "macs_vs_dense", "latency_vs_dense", "note"]


def measure_point(model: torch.nn.Module, input_size: tuple[int, int, int], batch_size: int, device: str,
                  warmup: int, repeats: int, backward: bool) -> dict:
    """Parameters, MACs per image and latency of one model, with the share of the machine other processes used
    while it was timed (``other_load``; a warning when contended).

    Args:
        model: the model to measure.
        input_size: ``(C, H, W)``.
        batch_size: images per timed call.
        device: where to time it.
        warmup: untimed calls first.
        repeats: timed calls.
        backward: time forward + backward instead of inference.
    """
    cost = model_cost(model, input_size)
    latency = measure_latency(model, input_size, batch_size, device, warmup, repeats, backward)
    if latency.contended:
        log.warning("latency measured while other processes used %.0f %% of the machine: not to be trusted",
                    100 * latency.other_load)
    return {"params": cost.params, "macs": cost.macs, "latency_ms": latency.median_ms,
            "latency_q1_ms": latency.q1_ms, "latency_q3_ms": latency.q3_ms, "other_load": latency.other_load}


def spectrum_table(
    model_name: str,
    segments: Sequence[int | str],
    order: str = "depthwise_first",
    input_size: tuple[int, int, int] | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    warmup: int = 2,
    repeats: int = 5,
    backward: bool = False,
    compare: Sequence[str] = (),
    model_kwargs: dict | None = None,
) -> pd.DataFrame:
    """One row per segment count (and per comparison model): cost and latency, and their ratio to 1 segment.

    Segment counts a model cannot take get a row with the reason in ``note`` and no numbers.

    Args:
        model_name: a registered timm model taking ``segments`` and ``order`` (``continuum_small``, ...).
        segments: the counts to measure.
        order: operation order of every unit.
        input_size: ``(C, H, W)``; ``None`` takes the model's ``pretrained_cfg``.
        batch_size: images per timed call.
        device: where to time.
        warmup: untimed calls per point.
        repeats: timed calls per point.
        backward: time forward + backward.
        compare: other timm models to measure beside it at their defaults (e.g. ``continuum_inception_v3``).
        model_kwargs: extra keyword arguments for every ``create_model`` call (``num_classes``, ``uneven``, ...).
    """
    model_kwargs = dict(model_kwargs or {})
    rows = []
    for count in segments:
        row = {"model": model_name, "segments": str(count), "order": order, "note": ""}
        try:
            model = timm.create_model(model_name, segments=count, order=order, **model_kwargs)
        except SegmentError as err:
            rows.append(row | {"note": str(err)})
            continue
        size = input_size or tuple(model.pretrained_cfg["input_size"])
        log.info("measuring %s segments=%s at %s", model_name, count, size)
        rows.append(row | measure_point(model, size, batch_size, device, warmup, repeats, backward))
    for name in compare:
        model = timm.create_model(name, **model_kwargs)
        size = input_size or tuple(model.pretrained_cfg["input_size"])
        rows.append({"model": name, "segments": "", "order": "", "note": "baseline"}
                    | measure_point(model, size, batch_size, device, warmup, repeats, backward))
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    dense = table[(table["model"] == model_name) & (table["segments"] == "1")]
    if not dense.empty and pd.notna(dense["params"].iloc[0]):
        for column in ("params", "macs", "latency"):
            source = "latency_ms" if column == "latency" else column
            table[f"{column}_vs_dense"] = table[source] / dense[source].iloc[0]
    return table


def parse_args(argv: Sequence[str] | None = None, prog: str = "python -m continuum.spectrum") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="continuum_small", help="registered timm model (default: %(default)s)")
    parser.add_argument("--segments", default="1,2,4,8,16,32,all", help="comma list (default: %(default)s)")
    parser.add_argument("--order", default="depthwise_first", help="depthwise_first or pointwise_first")
    parser.add_argument("--input-size", default=None, help="C,H,W (default: the model's own)")
    parser.add_argument("--num-classes", default=None, help="classes (default: the model's own)")
    parser.add_argument("--uneven", action="store_true", help="near-equal segments where a count does not divide")
    parser.add_argument("--batch-size", default="16", help="images per timed call (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    parser.add_argument("--warmup", default="2", help="untimed calls per point (default: %(default)s)")
    parser.add_argument("--repeats", default="5", help="timed calls per point (default: %(default)s)")
    parser.add_argument("--backward", action="store_true", help="time forward + backward instead of inference")
    parser.add_argument("--compare", default="", help="comma list of timm models to measure beside it")
    parser.add_argument("--strategy", default="auto", help="segmented-conv kernels: auto (autotuned) or native "
                        "(plain grouped conv) (default: %(default)s)")
    parser.add_argument("--out", default="results/cost", help="folder for the CSV and Markdown table")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, prog: str = "python -m continuum.spectrum") -> int:
    """Run the command with ``argv`` (``prog``: how it is called); returns the exit code (2: bad input)."""
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        keep_freed_memory()
        segments = comma_list("--segments", parse_segments, "1,4,all")(args.segments)
        order = parse_order(args.order)
        input_size = None
        if args.input_size:
            input_size = tuple(checked("--input-size", integer(1), v) for v in comma_items("--input-size",
                                                                                            args.input_size))
            if len(input_size) != 3:
                raise ValueError(f"--input-size {args.input_size!r} is not valid; give C,H,W such as 1,28,28")
        args.num_classes = checked("--num-classes", optional(integer(0)), args.num_classes)
        args.batch_size = checked("--batch-size", integer(1), args.batch_size)
        args.warmup = checked("--warmup", integer(0), args.warmup)
        args.repeats = checked("--repeats", integer(1), args.repeats)
        resolve_device(args.device)
        check_environment()
        check_writable_folder(Path(args.out), "--out")
        compare = comma_items("--compare", args.compare)
        for name in [args.model, *compare]:
            if not timm.is_model(name):
                raise ValueError(f"--model/--compare {name!r} is not a registered model; continuum's are "
                                 f"{', '.join(timm.list_models('continuum_*'))}")
        with conv_strategy(args.strategy):
            table = spectrum_table(
                args.model, segments, order, input_size, args.batch_size, args.device, args.warmup, args.repeats,
                args.backward, compare,
                {"num_classes": args.num_classes, "uneven": args.uneven or None},
            )
        refused = table[(table["model"] == args.model) & (table["note"] != "")]
        if len(refused) == len(segments):  # a table of notes alone would replace an earlier one's numbers
            raise ValueError(f"--segments {args.segments}: no count fits {args.model} "
                             f"({refused['note'].iloc[0]}); {args.out} is left as it was")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    mode = "fwd+bwd" if args.backward else "inference"
    title = (f"{args.model}, order={order}, batch {args.batch_size}, {mode}, {args.strategy} kernels, "
             f"{device_name(torch.device(args.device))}, torch {torch.__version__}")
    print(title)
    print(table.drop(columns=["latency_q1_ms", "latency_q3_ms"]).to_string(index=False, float_format="%.3g"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.model}_{order}_{'bwd' if args.backward else 'fwd'}_{args.strategy}_{args.device.replace(':', '')}"
    atomic_write(out / f"{stem}.csv", lambda path: table.to_csv(path, index=False))
    command = "python -m continuum.spectrum " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"# {title}\n\n`{command.strip()}`\n\n{table.to_markdown(index=False)}\n"
    atomic_write(out / f"{stem}.md", lambda path: path.write_text(text))
    print(f"wrote {out / stem}.csv and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
