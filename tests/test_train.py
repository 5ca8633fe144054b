"""The training loop: augmentation on the device, recipes, determinism, failures."""

import math

import pytest
import timm
import torch
from torch import nn

import continuum  # noqa: F401
from continuum import conv_strategy
from continuum.config import TrainConfig
from continuum.data import make_synthetic
from continuum.kernels import is_channels_last
from continuum.train import StopRequested, TrainingFailed, augment_batch, batch_bounds, fit, lr_factor, \
    resolve_device, resolve_precision


def test_augment_crops_with_padding_and_flips():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    generator = torch.Generator().manual_seed(0)
    out = augment_batch(x, pad=1, hflip=False, generator=generator)
    assert out.shape == x.shape
    for image, original in zip(out, x):  # every crop is a window of the zero-padded image
        padded = nn.functional.pad(original, (1, 1, 1, 1))
        windows = [padded[:, i:i + 4, j:j + 4] for i in range(3) for j in range(3)]
        assert any(torch.equal(image, w) for w in windows)
    flipped = augment_batch(x.repeat(50, 1, 1, 1), pad=0, hflip=True, generator=generator)
    is_flip = [torch.equal(f, o.flip(2)) for f, o in zip(flipped, x.repeat(50, 1, 1, 1))]
    assert 10 < sum(is_flip) < 90
    assert torch.equal(augment_batch(x, pad=0, hflip=False, generator=generator), x)


def test_recipes():
    assert lr_factor("cosine", 0, 100) == 1 and lr_factor("cosine", 100, 100) == pytest.approx(0)
    assert lr_factor("paper_sgd", 50, 100) == pytest.approx(0.94 ** 25)
    assert lr_factor("paper_rmsprop", 10, 300) == pytest.approx(0.9)


def test_warm_up_rises_linearly_then_the_recipe_runs_over_the_steps_left():
    factors = [lr_factor("cosine", step, 14, warmup_steps=4) for step in range(14)]
    assert factors[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert factors[4 + 5] == pytest.approx(0.5)  # half-way through the 10 steps after the warm-up
    assert all(a > b for a, b in zip(factors[4:], factors[5:]))
    with pytest.raises(ValueError, match="warmup_epochs=2 is not valid; warm up for fewer epochs than the run's 2"):
        TrainConfig(epochs=2, warmup_epochs=2).validate()
    with pytest.raises(ValueError, match="lr=-1 is not valid"):
        TrainConfig(lr=-1).validate()
    assert TrainConfig(recipe="paper_sgd").resolved_lr == 0.045
    assert TrainConfig(recipe="paper_sgd").resolved_weight_decay == 1e-5


def test_batches_cover_every_image_once_and_never_hold_one_image_alone():
    assert batch_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_bounds(9, 4) == [(0, 4), (4, 9)]  # the ninth image joins the batch before it
    assert batch_bounds(8, 4) == [(0, 4), (4, 8)]
    assert batch_bounds(3, 64) == [(0, 3)] and batch_bounds(1, 64) == [(0, 1)]
    assert batch_bounds(5, 1) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]


def test_a_last_batch_of_one_image_trains_where_batch_norm_sees_one_value_per_channel():
    model = timm.create_model("continuum_small", width_mult=0.25, in_chans=1)  # 1 x 1 images: 1 x 1 at every layer
    result = fit(model, make_synthetic(train_size=9, val_size=4, input_size=(1, 1, 1)),
                 TrainConfig(epochs=1, batch_size=4, augment=False), progress=False)
    assert len(result.curve) == 1


def _run(seed: int, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model("continuum_small", segments=4, width_mult=0.25)
    return fit(model, make_synthetic(train_size=128, val_size=64), TrainConfig(epochs=2, batch_size=32, **kwargs),
               seed=seed, progress=False)


def test_fit_records_curves_and_is_deterministic():
    first, again, other = _run(0), _run(0), _run(1)
    assert [m["epoch"] for m in first.curve] == [1, 2]
    assert set(first.curve[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_lr", "seconds",
                                   "images_per_s"}
    assert first.curve[1]["epoch_lr"] < first.curve[0]["epoch_lr"] == 0.05
    assert first.best_val_acc == max(m["val_acc"] for m in first.curve)
    assert [m["train_loss"] for m in first.curve] == [m["train_loss"] for m in again.curve]
    assert first.curve[0]["train_loss"] != other.curve[0]["train_loss"]


@pytest.mark.parametrize("recipe", ["paper_sgd", "paper_rmsprop"])
def test_paper_recipes_train(recipe):
    result = _run(0, recipe=recipe)
    assert all(math.isfinite(m["train_loss"]) for m in result.curve)


def test_non_finite_loss_fails_the_run():
    with pytest.raises(TrainingFailed, match="non-finite training loss"):
        _run(0, lr=1e30)


def test_on_epoch_can_stop_the_run():
    seen = []

    def stop(metrics):
        seen.append(metrics["epoch"])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(timm.create_model("continuum_small"), make_synthetic(train_size=64, val_size=32),
            TrainConfig(epochs=3, batch_size=32), on_epoch=stop, progress=False)
    assert seen == [1]


def _fit_tiny(snapshot, on_epoch=None, seed=0, epochs=3, lr=0.05, stop=None):
    """A dropout net (the global generator matters too) on 64 images, native convs: runs that must be equal are."""
    torch.manual_seed(seed)
    model = timm.create_model("continuum_small", width_mult=0.25, drop_rate=0.5)
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=lr)
    with conv_strategy("native"):
        result = fit(model, make_synthetic(train_size=64, val_size=32), cfg, seed=seed, on_epoch=on_epoch,
                     progress=False, snapshot=snapshot, stop=stop)
    return model, result


def _stop_after(epoch):
    def stop(metrics):
        if metrics["epoch"] == epoch:
            raise KeyboardInterrupt
    return stop


def _same_run(a, b):
    model_a, result_a = a
    model_b, result_b = b
    assert all(torch.equal(x, y) for x, y in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    assert [(m["train_loss"], m["val_acc"]) for m in result_a.curve] == \
        [(m["train_loss"], m["val_acc"]) for m in result_b.curve]


def test_an_interrupted_run_resumes_from_its_snapshot_to_the_uninterrupted_runs_weights(tmp_path):
    snapshot = tmp_path / "state" / "run.pt"
    straight = _fit_tiny(None)
    with pytest.raises(KeyboardInterrupt):
        _fit_tiny(snapshot, on_epoch=_stop_after(2))  # stopped during epoch 2's record: epoch 1 is saved
    assert snapshot.exists()
    seen = []
    resumed = _fit_tiny(snapshot, on_epoch=lambda metrics: seen.append(metrics["epoch"]))
    assert resumed[1].resumed_epochs == 1 and seen == [1, 2, 3]  # the saved epoch is replayed to on_epoch
    _same_run(straight, resumed)
    assert not snapshot.parent.exists()  # removed when the run finished, with its folder


def test_a_stop_asked_for_ends_the_run_after_the_epoch_once_it_is_saved_and_loses_nothing(tmp_path):
    snapshot = tmp_path / "run.pt"
    asked = []
    with pytest.raises(StopRequested, match="stopped after epoch 1 of 3"):
        _fit_tiny(snapshot, stop=lambda: not asked.append(True))  # asks to stop at the first question
    assert len(asked) == 1
    asked.clear()
    resumed = _fit_tiny(snapshot, stop=lambda: bool(asked.append(True)))  # never asks to stop
    assert resumed[1].resumed_epochs == 1 and len(asked) == 1  # asked after epoch 2, not after the last
    _same_run(_fit_tiny(None), resumed)


@pytest.mark.parametrize("other", [{"seed": 1}, {"lr": 0.1}, {"epochs": 4}])
def test_a_snapshot_of_another_run_is_not_resumed(tmp_path, other, caplog):
    snapshot = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        _fit_tiny(snapshot, on_epoch=_stop_after(2), **other)
    with caplog.at_level("WARNING", logger="continuum.train"):
        resumed = _fit_tiny(snapshot)  # refused before anything of it is loaded
    assert resumed[1].resumed_epochs == 0 and "belongs to another configuration or seed" in caplog.text


def test_an_unreadable_snapshot_trains_from_the_start(tmp_path, caplog):
    snapshot = tmp_path / "run.pt"
    snapshot.write_bytes(b"half a file")
    with caplog.at_level("WARNING", logger="continuum.train"):
        model, result = _fit_tiny(snapshot, epochs=1)
    assert result.resumed_epochs == 0 and "training from the start" in caplog.text and not snapshot.exists()


@pytest.mark.parametrize("error, reason", [
    (OSError(28, "No space left on device"), "No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), "is the disk full?"),
])
def test_a_snapshot_that_cannot_be_written_does_not_stop_the_run(tmp_path, monkeypatch, caplog, error, reason):
    from continuum import train

    def disk_full(path, write):  # torch.save reports a full disk as the RuntimeError above
        raise error

    monkeypatch.setattr(train, "atomic_write", disk_full)
    with caplog.at_level("WARNING", logger="continuum.train"):
        _same_run(_fit_tiny(None, epochs=2), _fit_tiny(tmp_path / "run.pt", epochs=2))
    assert reason in caplog.text and "goes on without it" in caplog.text


def test_a_diverged_run_removes_its_snapshot(tmp_path):
    snapshot = tmp_path / "run.pt"
    with pytest.raises(TrainingFailed):
        _fit_tiny(snapshot, lr=1e30)
    assert not snapshot.exists()


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not valid"):
        resolve_device("abacus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_with_bf16_and_channels_last():
    result = _run(0, device="cuda")
    assert all(math.isfinite(m["train_loss"]) for m in result.curve)


@pytest.mark.parametrize("channels_last, precision", [(True, "fp32"), (False, "fp32"), (True, "bf16")])
def test_memory_format_and_precision_reach_every_conv(channels_last, precision):
    torch.manual_seed(0)
    model = timm.create_model("continuum_small", segments=4)
    seen = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, inputs, out: seen.append(
                (out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous(), out.dtype)))
    cfg = TrainConfig(epochs=1, batch_size=32, channels_last=channels_last, precision=precision)
    with conv_strategy("native"):  # what reaches the convs, not how fast: no tuning
        result = fit(model, make_synthetic(train_size=32, val_size=32), cfg, progress=False)
    assert math.isfinite(result.curve[0]["train_loss"])
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert seen and all(layout == channels_last and dtype == want for layout, dtype in seen)
    weight = next(p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2:] == (3, 3))
    assert is_channels_last(weight) == channels_last


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    from continuum import train
    monkeypatch.setattr(train, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(train, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_every_compiled_run_in_a_process_is_compiled_whole(dynamo_counters):
    """One graph for training and one for evaluation per model, none broken by the conv and batch norm layers' checks;
    and dynamo, which compiles a function in at most ``recompile_limit`` versions per process and then runs it
    uncompiled, compiles a sweep worker's later models too (``fit`` resets it)."""
    data = make_synthetic(train_size=16, val_size=8, seed=0)
    # torch's own patch: monkeypatch's undo deleted the option from dynamo's config module, failing later compiles
    with torch._dynamo.config.patch(recompile_limit=2):  # the second model would pass it
        for segments in (1, 4, "all"):
            model = timm.create_model("continuum_small", segments=segments, widths=(8, 8), depths=1, strides=(2, 2),
                                      stem_width=8)
            dynamo_counters.clear()
            fit(model, data, TrainConfig(epochs=1, batch_size=8, compile=True, precision="fp32"), progress=False)
            assert dict(dynamo_counters["frames"]) == {"total": 2, "ok": 2}, segments
            assert dynamo_counters["stats"]["unique_graphs"] == 2 and not dynamo_counters["graph_break"], segments
