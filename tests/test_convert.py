"""convert(): any model's k x k convs moved along the continuum, the original untouched, exact where it can be."""

import contextlib

import pandas as pd
import pytest
import timm
import torch
import torchvision
from torch import nn

from continuum import ContinuumConv, SegmentedConv2d, convert, plan_conversion


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def test_resnet18_convert_segments_every_dense_3x3_and_reports_the_stem(resnet18):
    before = {k: v.clone() for k, v in resnet18.state_dict().items()}
    with pytest.warns(UserWarning, match=r"convert left 1 conv\(s\) as they are: conv1 \(segments=4 does not fit "
                                         r"in_channels=3, out_channels=64; valid choices: one of \[1\] \("):
        converted = convert(resnet18, segments=4).eval()
    convs = {n: m for n, m in converted.named_modules() if isinstance(m, SegmentedConv2d)}
    assert len(convs) == 16 and all(m.segments == 4 for m in convs.values())
    assert type(converted.conv1) is nn.Conv2d and type(converted.layer2[0].downsample[0]) is nn.Conv2d
    assert converted(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    # the original is untouched
    assert all(type(m) is nn.Conv2d for m in resnet18.modules() if isinstance(m, nn.Conv2d))
    for key, value in resnet18.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_resnet18_carried_weights_are_the_diagonal_blocks(resnet18):
    with pytest.warns(UserWarning, match="conv1"):
        converted = convert(resnet18, segments=4)
    old, new = resnet18.layer1[0].conv1.weight, converted.layer1[0].conv1.weight  # 64 -> 64, 16 per segment
    torch.testing.assert_close(new[16:32], old[16:32, 16:32], rtol=0, atol=0)
    torch.testing.assert_close(converted.fc.weight, resnet18.fc.weight)


def test_plan_says_what_happens_to_each_conv(resnet18):
    plan = pd.DataFrame(plan_conversion(resnet18, segments=4)).set_index("layer")
    assert plan.loc["conv1", "action"] == "skipped"
    assert plan.loc["layer1.0.conv1", "action"] == "segmented" and not plan.loc["layer1.0.conv1", "exact"]
    assert plan.loc["layer2.0.downsample.0", "action"] == "unchanged"
    assert (plan["action"] == "segmented").sum() == 16


def test_uneven_converts_the_stem_too(resnet18):
    converted = convert(resnet18, segments=2, uneven=True)
    assert converted.conv1.in_sizes == (2, 1) and converted.conv1.out_sizes == (32, 32)
    assert converted(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("target", [1, 2, 8])
def test_depthwise_to_fewer_segments_is_exactly_function_preserving(target):
    torch.manual_seed(0)
    model = timm.create_model("continuum_small", segments="all").eval()
    plan = plan_conversion(model, segments=target)
    spatial = [p for p in plan if p.action == "segmented"]
    assert spatial and all(p.exact for p in spatial)
    with pytest.warns(UserWarning, match="stem.0") if target > 1 else contextlib.nullcontext():
        converted = convert(model, segments=target).eval()
    assert converted.stages.stage2[0].rep[1].spatial.segments == target
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)


def test_grouped_to_a_count_that_does_not_divide_its_groups_is_not_exact():
    conv = nn.Sequential(nn.Conv2d(12, 12, 3, groups=4))
    plan = plan_conversion(conv, segments=3)
    assert plan[0].action == "segmented" and not plan[0].exact
    assert plan_conversion(conv, segments=2)[0].exact


def test_order_replaces_convs_by_separable_units(resnet18):
    with pytest.warns(UserWarning, match=r"conv1 \(segments='all' needs out_channels \(64\) to be a multiple"):
        converted = convert(resnet18, segments="all", order="pointwise_first", mid_act="relu")
    unit = converted.layer3[0].conv1
    assert isinstance(unit, ContinuumConv) and unit.order == "pointwise_first" and unit.spatial.stride == (2, 2)
    assert isinstance(unit.mid_act, nn.ReLU)
    assert converted(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_convert_errors():
    model = nn.Sequential(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="mid_act needs order="):
        convert(model, segments=2, mid_act="relu")
    with pytest.raises(ValueError, match="use an int >= 1 or 'all'"):
        convert(model, segments=0)
    with pytest.raises(ValueError, match="order='inside_out' is not valid"):
        convert(model, order="inside_out")
    with pytest.raises(ValueError, match="segment_width=0 is not valid; use an int >= 1"):
        convert(model, segment_width=0)
    with pytest.raises(TypeError, match="model is a str, not a torch.nn.Module"):
        convert("resnet18")
    with pytest.warns(UserWarning, match="convert found no nn.Conv2d in the Linear"):
        convert(nn.Linear(3, 3))
    with pytest.warns(UserWarning, match="segments=3 does not fit"):  # uneven="no" is off: the conv is left
        assert isinstance(convert(nn.Sequential(nn.Conv2d(4, 4, 3)), segments=3, uneven="no")[0], nn.Conv2d)
    with pytest.raises(ValueError, match="uneven='some' is not valid"):
        convert(model, uneven="some")


@pytest.mark.parametrize("order", [None, "depthwise_first", "pointwise_first"])
def test_factorised_kernels_keep_their_shape(order):
    """Inception V3's 1x7 and 7x1 convs stay 1x7 and 7x1, as segmented convs and as separable units."""
    net = nn.Sequential(nn.Conv2d(8, 16, (1, 7), padding=(0, 3)), nn.Conv2d(16, 16, (7, 1), padding=(3, 0)))
    converted = convert(net, segments=4, order=order)
    spatial = [m for m in converted.modules() if isinstance(m, SegmentedConv2d)]
    assert [m.kernel_size for m in spatial] == [(1, 7), (7, 1)]
    for original, new in zip(net, converted):
        x = torch.randn(1, original.in_channels, 9, 11)
        assert new(x).shape == original(x).shape == (1, original.out_channels, 9, 11)
