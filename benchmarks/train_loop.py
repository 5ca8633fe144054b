"""Training throughput: continuum's on-device loop vs a plain torchvision DataLoader loop, same model and data.

Both loops train the same model with the same optimiser, batch size and augmentation (random crop with padding,
horizontal flip); the baseline decodes and augments every image in Python through a DataLoader.

    python benchmarks/train_loop.py                          # CPU, continuum_small, Fashion-MNIST 10k images
    python benchmarks/train_loop.py --device cuda --images 60000 --segments 1,all

Prints a table and writes results/bench/train_loop_<device>.csv.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2

import continuum  # noqa: F401
from continuum.config import TrainConfig, argument, comma_list, integer
from continuum.data import fashion_mnist_root, load_fashion_mnist
from continuum.files import check_writable_folder
from continuum.knobs import parse_segments
from continuum.timing import device_name
from continuum.train import fit, make_optimizer, resolve_device


def dataloader_images_per_s(segments, images: int, batch_size: int, device: torch.device, workers: int) -> float:
    """Images/s of one epoch of a textbook loop: torchvision dataset + transforms + DataLoader."""
    root = fashion_mnist_root(None)  # the decompressed files, wherever the sweep reads them from
    transform = v2.Compose([v2.ToImage(), v2.RandomCrop(28, padding=3), v2.RandomHorizontalFlip(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.2860], [0.3530])])
    dataset = Subset(torchvision.datasets.FashionMNIST(str(root), train=True, transform=transform), range(images))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    torch.manual_seed(0)
    model = timm.create_model("continuum_small", segments=segments).to(device)
    optimizer = make_optimizer(model, TrainConfig())
    model.train()
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def continuum_images_per_s(segments, images: int, batch_size: int, device: torch.device) -> float:
    """Images/s of the training part of one epoch of :func:`continuum.train.fit` (validation excluded)."""
    data = load_fashion_mnist().subset(images, 256)
    torch.manual_seed(0)
    model = timm.create_model("continuum_small", segments=segments)
    result = fit(model, data, TrainConfig(epochs=1, batch_size=batch_size, device=str(device)), progress=False)
    return result.curve[0]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", type=argument(resolve_device))
    parser.add_argument("--images", type=argument(integer(1, 60_000)), default=10_000)
    parser.add_argument("--batch-size", type=argument(integer(1)), default=128)
    parser.add_argument("--segments", default="all,4")
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts to compare")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args()
    try:
        segment_counts = comma_list("--segments", parse_segments, "all,4")(args.segments)
        worker_counts = comma_list("--workers", integer(0), "0,2", named=True)(args.workers)
        check_writable_folder(Path(args.out), "--out")
    except ValueError as err:
        parser.error(str(err))
    device: torch.device = args.device
    name = device_name(device)
    rows = []
    for segments in segment_counts:
        ours = continuum_images_per_s(segments, args.images, args.batch_size, device)
        rows.append({"segments": segments, "loop": "continuum (tensors on device)", "images_per_s": ours})
        for workers in worker_counts:
            theirs = dataloader_images_per_s(segments, args.images, args.batch_size, device, workers)
            rows.append({"segments": segments, "loop": f"torchvision DataLoader, {workers} workers",
                         "images_per_s": theirs})
    table = pd.DataFrame(rows)
    table["speedup_of_continuum"] = table.groupby("segments")["images_per_s"].transform(
        lambda s: s.iloc[0] / s)
    table["device"] = name
    table["torch"] = torch.__version__
    print(f"continuum_small, Fashion-MNIST {args.images} images, batch {args.batch_size}, {name}")
    print(table.drop(columns=["device", "torch"]).to_string(index=False, float_format="%.2f"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train_loop_{device.type}.csv"
    table.to_csv(path, index=False)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
