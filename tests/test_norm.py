"""continuum's BatchNorm2d: torch's layer, with a C++ training pass on channels-last CPU tensors."""

import pandas as pd
import pytest
import timm
import torch
from torch import nn

import continuum
from conftest import load_benchmark
from continuum.compiled import batch_norm_kernels, built
from continuum.norm import BatchNorm2d
from continuum.strategy import conv_strategy

@pytest.fixture
def kernel():
    """Skips the test where the kernel cannot be built; asked at run time, so that collection never waits for the
    build (a worker builds it while the others run their tests)."""
    if batch_norm_kernels() is None:
        pytest.skip("the C++ batch norm needs a compiler")


needs_kernel = pytest.mark.usefixtures("kernel")

SETTINGS = {"default": {}, "no_affine": {"affine": False}, "cumulative": {"momentum": None},
            "no_running_stats": {"track_running_stats": False}, "eps": {"eps": 0.3}}


def twins(channels: int, dtype: torch.dtype, **kwargs) -> tuple[nn.BatchNorm2d, BatchNorm2d]:
    """torch's layer and ours with the same random weights."""
    ours = BatchNorm2d(channels, dtype=dtype, **kwargs)
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-0.5, 0.5)
    theirs = nn.BatchNorm2d(channels, dtype=dtype, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return theirs, ours


@needs_kernel
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_training_steps_match_torch_outputs_gradients_and_running_statistics(setting, monkeypatch):
    calls = []
    forward = batch_norm_kernels().forward
    monkeypatch.setattr(continuum.norm, "batch_norm_kernels",
                        lambda: type("Spy", (), {"forward": lambda *a: calls.append(1) or forward(*a),
                                                 "backward": batch_norm_kernels().backward}))
    torch.manual_seed(0)
    theirs, ours = twins(5, torch.float64, **SETTINGS[setting])
    for step in range(3):  # the running statistics move three times, from a batch far from zero mean
        x = (torch.randn(4, 5, 3, 7, dtype=torch.float64) * 3 + 40).contiguous(memory_format=torch.channels_last)
        upstream = torch.randn(4, 5, 3, 7, dtype=torch.float64)
        results = []
        for layer in (theirs, ours):
            x_in = x.clone().requires_grad_(True)
            y = layer(x_in)
            grads = torch.autograd.grad(y, [x_in, *layer.parameters()], upstream)
            results.append((y, *grads))
        for got, want in zip(results[1], results[0]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        assert results[1][0].is_contiguous(memory_format=torch.channels_last)
    assert len(calls) == 3  # the kernel ran every step
    for name, buffer in theirs.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], buffer, rtol=1e-12, atol=1e-12)
    theirs.eval(), ours.eval()  # evaluation with the running statistics (or batch statistics without them)
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-9, atol=1e-9)


@needs_kernel
def test_float32_matches_torch_and_a_frozen_layer_or_input_gets_only_the_gradients_asked_for():
    torch.manual_seed(1)
    theirs, ours = twins(64, torch.float32)
    x = torch.randn(8, 64, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    upstream = torch.randn(8, 64, 6, 6)
    want = torch.autograd.grad(theirs(x), [x, theirs.weight, theirs.bias], upstream)
    got = torch.autograd.grad(ours(x), [x, ours.weight, ours.bias], upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    ours.requires_grad_(False)  # frozen: only the input's gradient
    (grad_x,) = torch.autograd.grad(ours(x), [x], upstream)
    torch.testing.assert_close(grad_x, want[0], rtol=1e-4, atol=1e-5)
    ours.requires_grad_(True)
    weight_grad = torch.autograd.grad(ours(x.detach()), [ours.weight], upstream)[0]
    torch.testing.assert_close(weight_grad, want[1], rtol=1e-4, atol=1e-5)


@needs_kernel
def test_bfloat16_input_with_float32_weights_follows_torch():
    torch.manual_seed(2)
    theirs, ours = twins(16, torch.float32)
    x = (torch.randn(4, 16, 5, 5) * 2 + 30).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(4, 16, 5, 5).to(torch.bfloat16)
    results = []
    for layer in (theirs, ours):
        x_in = x.clone().requires_grad_(True)
        y = layer(x_in)
        results.append((y, *torch.autograd.grad(y, [x_in, layer.weight, layer.bias], upstream)))
    for got, want in zip(*reversed(results)):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.05)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-3, atol=1e-3)


@needs_kernel
def test_torchs_kernel_runs_where_ours_does_not(monkeypatch):
    monkeypatch.setattr(continuum.norm, "_ChannelsLastBatchNorm", None)  # any use of the kernel fails
    layer = BatchNorm2d(4)
    nchw = torch.randn(2, 4, 3, 3)
    assert layer(nchw).is_contiguous()
    channels_last = nchw.contiguous(memory_format=torch.channels_last)
    assert layer(channels_last.half()).dtype == torch.float16  # another dtype
    with conv_strategy("native"):
        layer(channels_last)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 4, 1, 1))  # torch's error, not ours
    with pytest.raises(ValueError, match="expected 4D input"):
        layer(torch.randn(2, 4, 3))
    layer.eval()
    layer(channels_last)  # running statistics: torch's
    torch.jit.script(layer)(channels_last)


def test_models_build_it_for_batchnorm2d_and_script_with_torchs():
    model = timm.create_model("continuum_small", segments=4, widths=(16, 32), depths=(1, 1), strides=(2, 2))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(type(m) is BatchNorm2d for m in norms)
    inception = timm.create_model("continuum_inception_small", widths=(16, 32), depths=(1, 1))
    assert any(type(m) is BatchNorm2d for m in inception.modules())
    x = torch.randn(3, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    model(x).sum().backward()  # a training step through the kernel
    scripted = torch.jit.script(model.eval())
    assert not any(isinstance(m, BatchNorm2d) for m in scripted.modules())
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
    norms[-1].running_mean.add_(1.0)  # shared, not copied: the scripted model sees the change
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@needs_kernel
def test_the_benchmark_writes_both_tables(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["batch_norm.py", "--shapes", "8x4x2", "--segments", "all", "--batch", "4",
                                     "--dtypes", "fp32,bf16", "--rounds", "2", "--out", str(tmp_path)])
    load_benchmark("batch_norm").main()
    layers = pd.read_csv(tmp_path / "batch_norm_layers_cpu.csv")
    steps = pd.read_csv(tmp_path / "batch_norm_step_cpu.csv")
    assert list(layers.direction) == ["fwd", "fwd+bwd"] * 2 and list(layers.dtype) == ["fp32"] * 2 + ["bf16"] * 2
    assert (layers.rounds == 2).all()
    assert (layers.speedup_low <= layers.speedup).all() and (layers.speedup <= layers.speedup_high).all()
    assert list(steps.segments) == ["all", "all"] and list(steps.dtype) == ["fp32", "bf16"]
    assert (steps.ours_images_per_s > 0).all()


def test_the_kernel_builds_here_and_without_it_torchs_batch_norm_runs(monkeypatch, building_on):
    assert batch_norm_kernels() is not None  # a compiler and ninja are here, as for the conv kernels
    monkeypatch.setenv("CONTINUUM_BUILD_KERNELS", "0")
    built.cache_clear()
    try:
        assert batch_norm_kernels() is None
        theirs, ours = twins(6, torch.float32)
        x = torch.randn(4, 6, 5, 5).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)  # torch's own kernel: bit for bit
    finally:
        built.cache_clear()
