"""The Triton segmented-conv kernel against F.conv2d, forward and backward: on CUDA where there is one, else on the
CPU in Triton's interpreter (``conftest`` sets ``TRITON_INTERPRET=1`` before anything imports Triton)."""

import pytest
import torch
import torch.nn.functional as F

from continuum import triton_kernels
from continuum.kernels import ConvGeometry, Strategy, candidates, run_strategy

pytest.importorskip("triton")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("channels, out, groups", [(40, 40, 40), (8, 16, 8), (48, 48, 12)],
                         ids=["depthwise", "multiplier-2", "4-per-segment"])  # 40, 48 > a block of 32 channels
@pytest.mark.parametrize("stride, padding, dilation, bias", [
    (1, 1, 1, False), (2, 1, 1, True), (1, 2, 2, True), (2, 0, 1, False), (1, 3, 3, True)])
def test_forward_and_backward_equal_the_native_conv(channels, out, groups, stride, padding, dilation, bias):
    torch.manual_seed(0)
    x = torch.randn(2, channels, 7, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(out, channels // groups, 3, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(out, device=DEVICE, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)
    exact = [t.detach().double().requires_grad_(True) for t in inputs]  # float64: cuDNN's fp32 convs may use TF32
    args = [stride] * 2, [padding] * 2, [dilation] * 2
    y = triton_kernels.segmented_conv(x, w, b, *args, groups)
    ref = F.conv2d(*exact[:2], exact[2] if bias else None, stride, padding, dilation, groups)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, inputs, upstream), torch.autograd.grad(ref, exact, upstream.double())):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels, out, groups", [(40, 40, 40), (48, 48, 12)], ids=["depthwise", "4-per-segment"])
def test_bf16_tensors_are_summed_in_float32(channels, out, groups):
    torch.manual_seed(0)
    x = torch.randn(2, channels, 7, 6, device=DEVICE).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(out, channels // groups, 3, 3, device=DEVICE).to(torch.bfloat16)
    b = torch.randn(out, device=DEVICE).to(torch.bfloat16)
    x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)
    exact = [t.detach().double().requires_grad_(True) for t in (x, w, b)]  # the same bf16 values, summed exactly
    y = triton_kernels.segmented_conv(x, w, b, [1, 1], [1, 1], [1, 1], groups)
    ref = F.conv2d(*exact, 1, 1, 1, groups)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, rtol=8e-3, atol=8e-3)  # one bf16 rounding of a float32 sum
    upstream = torch.randn_like(y)
    expected = torch.autograd.grad(ref, exact, upstream.double())
    for got, want in zip(torch.autograd.grad(y, (x, w, b), upstream), expected):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, rtol=8e-3, atol=2e-2)


def test_the_op_passes_torch_library_checks():
    x = torch.randn(1, 4, 4, 4, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(4, 1, 3, 3, device=DEVICE, requires_grad=True)
    torch.library.opcheck(triton_kernels.segmented_conv, (x, w, None, [1, 1], [1, 1], [1, 1], 4),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_it_is_a_strategy_on_cuda_only():
    geom = ConvGeometry((1, 1), (1, 1), (1, 1), 8)
    assert Strategy("triton") not in candidates(8, 8, (3, 3), geom, "cpu")
    assert Strategy("triton") in candidates(8, 8, (3, 3), geom, "cuda")  # with Triton installed
    assert Strategy("triton") not in candidates(64, 64, (3, 3), ConvGeometry((1, 1), (1, 1), (1, 1), 2), "cuda")
    x, w = torch.randn(2, 8, 5, 5, device=DEVICE), torch.randn(8, 1, 3, 3, device=DEVICE)
    y = run_strategy(Strategy("triton"), x, w, None, geom)  # on the CPU, the interpreter runs it
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1, 1, 8), rtol=1e-5, atol=1e-5)
    assert y.is_contiguous()  # back in the input's memory format


def test_without_the_interpreter_the_cpu_refuses_it(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = torch.randn(2, 8, 5, 5), torch.randn(8, 1, 3, 3)
    with pytest.raises(ValueError, match="strategy triton runs on CUDA"):
        run_strategy(Strategy("triton"), x, w, None, ConvGeometry((1, 1), (1, 1), (1, 1), 8))
