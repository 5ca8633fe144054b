"""Cost accounting: the analytic formulas against parameter storage and torch's FLOP counter."""

import pytest
import timm
import torch
import torchvision
from torch import nn

import continuum  # noqa: F401
from continuum import ContinuumConv, SegmentedConv2d
from continuum.cost import counted_flops, layer_costs, measure_latency, model_cost, saved_bytes_per_image


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_formulas_match(model: nn.Module, input_size: tuple[int, int, int]) -> None:
    cost = model_cost(model, input_size)
    assert cost.params == n_params(model)
    assert cost.flops == counted_flops(model, input_size)


@pytest.mark.parametrize("segments", [1, 2, 4, 8, 16, 32, "all"])
@pytest.mark.parametrize("order", ["depthwise_first", "pointwise_first"])
def test_small_family_formulas_match(segments, order):
    assert_formulas_match(timm.create_model("continuum_small", segments=segments, order=order), (1, 28, 28))


@pytest.mark.parametrize("kwargs", [
    dict(segments=5, uneven=True, bias=True, padding=1),
    dict(segments="all", stride=2, padding=2, dilation=2),
    dict(segments=2, padding="same"),
    dict(segments=3, stride=(2, 1), kernel_size=(3, 5)),
])
def test_segmented_conv_formula_matches(kwargs):
    kwargs = {"kernel_size": 3} | kwargs
    conv = SegmentedConv2d(12, 18 if kwargs["segments"] != "all" else 24, **kwargs)
    assert_formulas_match(conv, (12, 13, 11))


def test_separable_unit_cost_in_closed_form():
    unit = ContinuumConv(32, 64, 3, segments=4)
    cost = model_cost(unit, (32, 10, 10))
    spatial, pointwise = 32 * (32 // 4) * 9, 32 * 64
    assert cost.params == spatial + pointwise
    assert cost.macs == (spatial + pointwise) * 100


def test_xception_formulas_match_at_299():
    model = timm.create_model("continuum_xception")
    cost = model_cost(model, (3, 299, 299))
    assert cost.params == 22_855_952
    assert cost.flops == counted_flops(model, (3, 299, 299))
    assert 8.3e9 < cost.macs < 8.4e9


def test_torchvision_resnet_with_linear_and_norms_matches():
    assert_formulas_match(torchvision.models.resnet18(num_classes=10), (3, 64, 64))


def test_layer_table_has_one_row_per_costed_layer():
    model = timm.create_model("continuum_small", segments=4)
    table = layer_costs(model, (1, 28, 28))
    assert list(table.columns) == ["layer", "type", "in_shape", "out_shape", "params", "macs"]
    row = table.set_index("layer").loc["stages.stage1.0.rep.0.spatial"]
    assert row["type"] == "SegmentedConv2d" and row["in_shape"] == (32, 28, 28) and row["params"] == 32 * 8 * 9
    assert table["layer"].is_unique


def test_parameters_outside_forward_are_still_counted():
    class Extra(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Conv2d(3, 4, 3)
            self.unused = nn.Linear(5, 6)

        def forward(self, x):
            return self.used(x)

    table = layer_costs(Extra(), (3, 8, 8))
    assert table["params"].sum() == n_params(Extra())
    assert table["layer"].iloc[-1] == "(not called in forward)"


@pytest.mark.parametrize("backward", [False, True])
def test_latency_probe_times_and_restores_mode(backward):
    model = timm.create_model("continuum_small").train()
    latency = measure_latency(model, (1, 28, 28), batch_size=2, warmup=1, repeats=3, backward=backward)
    assert latency.device == "cpu" and latency.repeats == 3
    assert 0 < latency.q1_ms <= latency.median_ms <= latency.q3_ms
    assert model.training
    with pytest.raises(ValueError, match="repeats=0"):
        measure_latency(model, (1, 28, 28), repeats=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_latency_probe_on_cuda():
    latency = measure_latency(timm.create_model("continuum_small"), (1, 28, 28), device="cuda", repeats=3)
    assert latency.device.startswith("cuda") and latency.median_ms > 0


def test_other_processes_load_is_measured_beside_the_latency():
    import os
    import subprocess
    import sys
    import time

    from continuum.timing import OtherLoad

    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    with OtherLoad() as idle:
        time.sleep(0.5)  # whatever else the machine runs now (another job, on a shared machine)
    with OtherLoad() as own:
        spin(0.5)  # this process's own work does not count
    if own.share is None:
        pytest.skip("the system does not report CPU time (/proc/stat)")
    assert own.share < idle.share + 0.3
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        with OtherLoad() as busy:
            time.sleep(1.0)
    finally:
        for burner in burners:
            burner.kill()
    assert busy.share > 0.5


def test_saved_activations_per_image_in_closed_form():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)).eval()
    # conv 1 keeps its 1x8x8 input, the ReLU its 4x8x8 output (conv 2's input, the same tensor: counted once)
    assert saved_bytes_per_image(model, (1, 8, 8)) == (1 * 64 + 4 * 64) * 4
    assert not model.training  # put back as it was
    with torch.device("meta"):  # a meta model: sizes without memory
        small = timm.create_model("continuum_small", num_classes=10, in_chans=1)
    assert saved_bytes_per_image(small, (1, 28, 28)) == saved_bytes_per_image(
        timm.create_model("continuum_small", num_classes=10, in_chans=1), (1, 28, 28))
