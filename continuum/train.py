"""The training loop: ``fit(model, data, TrainConfig, seed, on_epoch=...) -> metrics``. No search logic here.

Images stay on the device as uint8; each step gathers a batch by index, augments it on the device (random crop with
padding, horizontal flips where the dataset allows them) and normalises it, with no per-sample Python.
The model and its batches are channels-last unless asked otherwise (faster on CPUs and GPUs); bf16 autocast where
the precision asks for it (``auto``: where the hardware computes bf16 natively). Shuffling and augmentation draw
from one seeded generator.

Given a ``snapshot`` file, ``fit`` saves the whole training state there after every epoch (weights, optimiser,
schedule, random generators, the curve so far) and, when the file already holds a run of the same configuration and
seed, continues it after its last epoch: an interrupted run resumes losing at most the epoch in progress, and ends
with the weights the uninterrupted run would have.

Recipes (learning rate as a function of the run's progress ``p`` in [0, 1], stepped every batch, after the
optional linear warm-up of ``warmup_epochs``, over the steps that follow it):

- ``cosine``: SGD, Nesterov momentum 0.9, ``lr * (1 + cos(pi p)) / 2``.
- ``paper_sgd``: the paper's ImageNet recipe, SGD momentum 0.9, ``lr * 0.94 ** floor(50 p)``: its "x0.94 every
  2 epochs" compressed so the run sees the 50 decays of a 100-epoch schedule.
- ``paper_rmsprop``: the paper's JFT recipe, RMSprop (decay 0.9, momentum 0.9, epsilon 1.0),
  ``lr * 0.9 ** floor(30 p)``: its "x0.9 every 3M samples" compressed to 30 decays over the run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from continuum.config import TrainConfig
from continuum.data import TensorData
from continuum.files import atomic_write
from continuum.timing import cpu_flags

log = logging.getLogger(__name__)

DECAYS = {"paper_sgd": (0.94, 50), "paper_rmsprop": (0.9, 30)}
"""Step-decay recipes: (factor per decay, decays over the run)."""


class TrainingFailed(RuntimeError):
    """A run that cannot go on (non-finite loss, ...); the message is the reason recorded for the trial."""


class StopRequested(KeyboardInterrupt):
    """A run stopped between epochs because its ``stop`` callback asked (see :func:`fit`): an interruption like
    Ctrl-C, after which nothing is lost that was saved."""


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when visible, else CPU; anything else is checked to exist.

    Raises:
        ValueError: a CUDA device was asked for but none is visible, or the name is not a device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not valid; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is visible; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible; "
                         "use cuda:0 .. cuda:N-1")
    return device


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimiser over all of ``model``'s parameters."""
    lr, decay = cfg.resolved_lr, cfg.resolved_weight_decay
    if cfg.recipe == "paper_rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=lr, alpha=0.9, momentum=0.9, eps=1.0, weight_decay=decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=cfg.recipe == "cosine",
                           weight_decay=decay)


def lr_factor(recipe: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Multiplier of the initial learning rate at ``step`` (0-based) of a run of ``total_steps``.

    The first ``warmup_steps`` rise linearly to 1 (``1/w, 2/w, ..., 1``); the recipe's schedule then runs over the
    steps left.

    Args:
        recipe: a recipe name from :data:`continuum.config.RECIPES`.
        step: the step about to be taken.
        total_steps: steps of the whole run.
        warmup_steps: steps of linear warm-up.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if recipe == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    factor, decays = DECAYS[recipe]
    return factor ** math.floor(decays * progress)


def augment_batch(x: torch.Tensor, pad: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flips, for a whole batch on its device.

    Args:
        x: ``N x C x H x W`` images.
        pad: padding on each side before cropping back to ``H x W``; 0 disables the crop.
        hflip: flip half of the images left-right.
        generator: source of randomness on ``x``'s device.
    """
    n, c, h, w = x.shape
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))  # N x C x H+2p x W+2p
        dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=generator)
        rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # N x 1 x H x 1
        cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]  # N x 1 x 1 x W
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        channel = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[batch, channel, rows, cols]  # N x C x H x W
    if hflip:
        flip = torch.rand(n, device=x.device, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch measured (one row of a study's ``curves.csv``).

    Args:
        epoch: the epoch, from 1.
        train_loss: mean training loss over the epoch.
        train_acc: training accuracy over the epoch (augmented images, the model changing as it goes).
        val_loss: validation loss after the epoch.
        val_acc: validation accuracy after the epoch.
        epoch_lr: the learning rate at the epoch's start.
        seconds: the epoch's training and validation time.
        images_per_s: training images per second of the epoch.
    """

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    epoch_lr: float
    seconds: float
    images_per_s: float


def curve_summary(curve: Sequence[dict]) -> dict[str, float]:
    """The final and best validation metrics of a curve so far (the one place they are computed).

    Args:
        curve: one :class:`EpochMetrics` dict per finished epoch (at least one).

    Returns:
        ``val_acc`` and ``val_loss`` after the last epoch, ``best_val_acc``, ``best_val_loss``, ``epochs_done``,
        ``train_s`` (training and validation seconds) and mean ``images_per_s``.
    """
    return {"val_acc": curve[-1]["val_acc"], "val_loss": curve[-1]["val_loss"],
            "best_val_acc": max(m["val_acc"] for m in curve), "best_val_loss": min(m["val_loss"] for m in curve),
            "epochs_done": len(curve), "train_s": sum(m["seconds"] for m in curve),
            "images_per_s": sum(m["images_per_s"] for m in curve) / len(curve)}


@dataclass
class FitResult:
    """What a run produced.

    Args:
        curve: one :class:`EpochMetrics` dict per epoch.
        train_seconds: time this call spent in training and validation (resumed epochs not counted).
        test_loss: mean test loss after training; ``None`` without a test split.
        test_correct: bool ``T``: whether each test image (in the dataset's order) was classified right.
        resumed_epochs: epochs taken from a snapshot of an interrupted run (their metrics as measured then).
    """

    curve: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    test_loss: float | None = None
    test_correct: torch.Tensor | None = None
    resumed_epochs: int = 0

    @property
    def test_acc(self) -> float | None:
        """Test accuracy after training; ``None`` without a test split."""
        return None if self.test_correct is None else self.test_correct.float().mean().item()

    @property
    def val_acc(self) -> float:
        """Validation accuracy after the last epoch."""
        return curve_summary(self.curve)["val_acc"]

    @property
    def val_loss(self) -> float:
        """Validation loss after the last epoch."""
        return curve_summary(self.curve)["val_loss"]

    @property
    def best_val_acc(self) -> float:
        """Best validation accuracy over the epochs."""
        return curve_summary(self.curve)["best_val_acc"]

    @property
    def best_val_loss(self) -> float:
        """Lowest validation loss over the epochs."""
        return curve_summary(self.curve)["best_val_loss"]


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"fp32"`` or ``"bf16"``: ``precision``, with ``"auto"`` resolved to bf16 where ``device`` computes it
    natively (CUDA; a CPU with AVX512-BF16 or AMX-BF16) and fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or {"avx512_bf16", "amx_bf16"} & cpu_flags() else "fp32"


class _Inputs:
    """Turns uint8 index batches into normalised float batches on the device, in the run's memory format."""

    def __init__(self, data: TensorData, device: torch.device, cfg: TrainConfig, generator: torch.Generator):
        mean, std = data.mean_std()
        self.mean = (mean * 255).view(1, -1, 1, 1).to(device)
        self.std = (std * 255).view(1, -1, 1, 1).to(device)
        self.pad = max(1, data.input_size[-1] // 8) if cfg.augment else 0
        self.hflip = cfg.augment and data.hflip
        self.generator = generator
        self.channels_last = cfg.channels_last
        self.autocast = resolve_precision(cfg.precision, device) == "bf16"  # bf16 autocast

    def __call__(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        x = x.float()
        if train:
            x = augment_batch(x, self.pad, self.hflip, self.generator)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def in_run_layout(model: nn.Module, device: torch.device, cfg: TrainConfig) -> nn.Module:
    """``model`` moved to ``device`` in the run's memory format (channels-last when ``cfg.channels_last``).

    Args:
        model: the model.
        device: the run's device.
        cfg: its memory format.
    """
    return model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)


def eval_batch_size(cfg: TrainConfig) -> int:
    """Images per evaluation batch: twice the training batch (no activations are kept for a backward pass)."""
    return 2 * cfg.batch_size


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, inputs: Callable, batch_size: int,
             autocast: bool) -> tuple[float, torch.Tensor]:
    """Mean cross-entropy of ``model`` on device tensors ``x`` (uint8) and ``y``, and which images it got right
    (bool ``N``, on the CPU; its mean is the accuracy)."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.empty(len(y), device=x.device, dtype=torch.bool)
    with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
        for start in range(0, len(y), batch_size):
            logits = model(inputs(x[start:start + batch_size], train=False)).float()
            target = y[start:start + batch_size]
            loss_sum += F.cross_entropy(logits, target, reduction="sum")
            correct[start:start + batch_size] = logits.argmax(1) == target
    return loss_sum.item() / len(y), correct.cpu()


def batch_loss(step_model: nn.Module, images: torch.Tensor, target: torch.Tensor, inputs: _Inputs,
               cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of one batch (``images``: ``B x C x H x W`` uint8 on the device) and its logits
    (``B x classes``), in the run's precision."""
    with torch.autocast(images.device.type, torch.bfloat16, enabled=inputs.autocast):
        logits = step_model(inputs(images, train=True))  # B x classes
        loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
    return loss, logits


def tune_kernels(model: nn.Module, data: TensorData, cfg: TrainConfig) -> None:
    """One training batch's forward and backward passes and one validation batch, as :func:`fit` runs them, with
    no optimizer step: the conv tuner (:mod:`continuum.strategy`) chooses and caches a kernel for each conv shape a
    run of ``model`` meets (but an epoch's smaller last batch). The model's gradients are left set.

    Args:
        model: the model, moved to ``cfg.device`` in the run's memory format.
        data: the dataset; its first training and validation images make the batches.
        cfg: the batch size, precision, memory format and device of the run.
    """
    device = resolve_device(cfg.device)
    inputs = _Inputs(data, device, cfg, torch.Generator(device=device).manual_seed(0))
    model = in_run_layout(model, device, cfg)
    model.train()
    loss, _ = batch_loss(model, data.train_x[:cfg.batch_size].to(device), data.train_y[:cfg.batch_size].to(device),
                         inputs, cfg)
    loss.backward()
    batch = eval_batch_size(cfg)
    evaluate(model, data.val_x[:batch].to(device), data.val_y[:batch].to(device), inputs, batch, inputs.autocast)


def batch_bounds(images: int, batch_size: int) -> list[tuple[int, int]]:
    """``(first, end)`` of each training batch of an epoch over ``images`` images: batches of ``batch_size`` in
    order, a last batch of a single image joined to the one before it (batch norm cannot normalise one image where
    a layer's output is 1 x 1, and every image still trains once).

    Args:
        images: images in an epoch.
        batch_size: images per batch.
    """
    starts = list(range(0, images, batch_size))
    if batch_size > 1 and len(starts) > 1 and images - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, [*starts[1:], images]))


def train_epoch(model: nn.Module, step_model: nn.Module, optimizer: torch.optim.Optimizer,
                schedule: torch.optim.lr_scheduler.LRScheduler, x: torch.Tensor, y: torch.Tensor, inputs: _Inputs,
                cfg: TrainConfig, generator: torch.Generator, bar: tqdm) -> tuple[float, float]:
    """One pass over ``x`` (uint8 images on the device) and ``y`` in a random order, one optimizer and schedule
    step per batch.

    Args:
        model: the model (set to training mode).
        step_model: what runs a step: the model, or its compiled form.
        optimizer: its optimizer.
        schedule: its learning-rate schedule, stepped per batch.
        x: training images, ``N x C x H x W`` uint8.
        y: their labels.
        inputs: turns index batches into normalised (augmented) float batches.
        cfg: batch size and label smoothing.
        generator: draws the order.
        bar: advanced once per step.

    Returns:
        ``(mean training loss, training accuracy)`` of the epoch.
    """
    model.train()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    order = torch.randperm(len(y), device=x.device, generator=generator)
    for first, end in batch_bounds(len(order), cfg.batch_size):
        index = order[first:end]
        target = y[index]
        loss, logits = batch_loss(step_model, x[index], target, inputs, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_sum += loss.detach() * len(index)
        correct += (logits.detach().argmax(1) == target).sum()
        bar.update()
    return loss_sum.item() / len(y), correct.item() / len(y)


class Snapshot:
    """A run's training state after its last finished epoch, in one file written atomically after each epoch.

    Args:
        path: the file.
        run: what the state belongs to (the training configuration and seed); a file of another run is not used.
        model: the model being trained.
        optimizer: its optimiser.
        schedule: its learning-rate schedule.
        generator: the run's generator (order and augmentation); the global generators (dropout) are kept too.
    """

    def __init__(self, path: Path, run: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator) -> None:
        self.path, self.run = path, run
        self.model, self.optimizer, self.schedule, self.generator = model, optimizer, schedule, generator

    def save(self, curve: list[dict]) -> None:
        """Write the state after the last epoch of ``curve``; a failed write (a full disk) is logged, and the run
        goes on without it."""
        state = {"run": self.run, "curve": curve, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                 "generator": self.generator.get_state(), "cpu_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}
        try:
            atomic_write(self.path, lambda tmp: torch.save(state, tmp))
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
            reason = err if isinstance(err, OSError) else "the write failed; is the disk full?"
            log.warning("could not save the training state to %s (%s); the run goes on without it", self.path,
                        reason)

    def restore(self) -> list[dict]:
        """Load the file's state into the run, and return the curve of the epochs it holds; ``[]`` (and the file
        removed) when there is none, it cannot be read, or it belongs to another run."""
        if not self.path.exists():
            return []
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if state["run"] != self.run:
                raise ValueError("it belongs to another configuration or seed")
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["cpu_rng"])
            if state["cuda_rng"]:
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            curve = list(state["curve"])
        except Exception as err:  # a file that cannot resume this run: train from the start
            log.warning("not resuming from %s (%s: %s); training from the start", self.path, type(err).__name__,
                        err)
            discard_snapshot(self.path)
            return []
        log.info("resuming after epoch %d from %s", len(curve), self.path)
        return curve


def discard_snapshot(path: Path) -> None:
    """Remove a run's snapshot file (the run ended: finished, failed or stopped for good), and its folder once
    empty."""
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:  # other runs' files are still there, or it is gone
        pass


def fit(
    model: nn.Module,
    data: TensorData,
    cfg: TrainConfig,
    seed: int = 0,
    on_epoch: Callable[[dict], None] | None = None,
    progress: bool = True,
    description: str = "",
    snapshot: Path | None = None,
    stop: Callable[[], bool] | None = None,
) -> FitResult:
    """Train ``model`` on ``data`` with ``cfg``, validate after every epoch, and score the test split (when ``data``
    holds one apart) once, after the last.

    Args:
        model: the model; moved to ``cfg.device`` (and compiled when ``cfg.compile``, after
            ``torch.compiler.reset()``: what this process compiled before is compiled again when next called).
        data: tensors of the dataset (moved to the device once).
        cfg: the training configuration.
        seed: seeds shuffling and augmentation (seed the model's initialisation before building it).
        on_epoch: called with each epoch's metrics; may raise to stop (e.g. ``optuna.TrialPruned``).
        progress: show a tqdm bar over the run's steps.
        description: the bar's label.
        snapshot: a file to save the training state to after every epoch, and to resume from when it holds this
            run's state (the same ``cfg`` and ``seed``). Removed when the run finishes or its loss diverges; kept
            when an interruption or another error stops it, so that a rerun resumes.
        stop: asked after every epoch but the last, once the epoch is saved: ``True`` stops the run there
            (:class:`StopRequested`), and a rerun with the snapshot goes on from the next epoch.

    Returns:
        The per-epoch curve (resumed epochs included), the final and best validation metrics, and the test loss and
        per-image correctness.

    Raises:
        TrainingFailed: the training or validation loss became NaN or infinite.
        StopRequested: ``stop`` asked to stop.
    """
    cfg = cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    val_x, val_y = data.val_x.to(device), data.val_y.to(device)
    inputs = _Inputs(data, device, cfg, generator)
    model = in_run_layout(model, device, cfg)
    if cfg.compile:  # a fresh start: dynamo stops compiling a function after 8 versions of it (4 models of a sweep's
        torch.compiler.reset()  # worker, in training and evaluation), and the rest would run uncompiled
    step_model = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = len(batch_bounds(len(train_y), cfg.batch_size))
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg.recipe, step, total_steps, warmup_steps))
    saved = Snapshot(snapshot, {"cfg": asdict(cfg), "seed": seed}, model, optimizer, schedule, generator) \
        if snapshot is not None else None
    curve = saved.restore() if saved is not None else []
    result = FitResult(curve=curve, resumed_epochs=len(curve))
    bar = tqdm(total=total_steps, initial=result.resumed_epochs * steps_per_epoch, desc=description,
               disable=not progress, leave=False, unit="step")
    start_run = time.perf_counter()
    try:
        for metrics in result.curve:  # the resumed epochs, as they were measured
            if on_epoch is not None:
                on_epoch(metrics)
        for epoch in range(result.resumed_epochs + 1, cfg.epochs + 1):
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            train_loss, train_acc = train_epoch(model, step_model, optimizer, schedule, train_x, train_y, inputs,
                                                cfg, generator, bar)
            if not math.isfinite(train_loss):
                raise TrainingFailed(f"non-finite training loss ({train_loss}) in epoch {epoch}")
            val_loss, val_correct = evaluate(step_model, val_x, val_y, inputs, eval_batch_size(cfg), inputs.autocast)
            val_acc = val_correct.float().mean().item()
            if not math.isfinite(val_loss):
                raise TrainingFailed(f"non-finite validation loss ({val_loss}) after epoch {epoch}: the weights "
                                     "diverged")
            seconds = time.perf_counter() - start
            metrics = asdict(EpochMetrics(epoch, train_loss, train_acc, val_loss, val_acc, lr, seconds,
                                          len(train_y) / seconds))
            result.curve.append(metrics)
            bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{val_acc:.3f}")
            if on_epoch is not None:
                on_epoch(metrics)
            if saved is not None:  # after on_epoch: a run it stopped saves nothing more
                saved.save(result.curve)
            if stop is not None and epoch < cfg.epochs and stop():
                raise StopRequested(f"stopped after epoch {epoch} of {cfg.epochs}")
        if data.test_x is not None:  # once, after training: no choice sees it
            result.test_loss, result.test_correct = evaluate(step_model, data.test_x.to(device),
                                                             data.test_y.to(device), inputs, eval_batch_size(cfg),
                                                             inputs.autocast)
        if snapshot is not None:
            discard_snapshot(snapshot)
    except TrainingFailed:
        if snapshot is not None:
            discard_snapshot(snapshot)
        raise
    finally:
        bar.close()
    result.train_seconds = time.perf_counter() - start_run
    return result
