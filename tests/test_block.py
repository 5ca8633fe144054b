"""The layers: shapes, gradients, exact equivalences with reference layers, option effects, error messages."""

import itertools

import numpy as np
import pytest
import torch
from timm.layers import SeparableConv2d
from torch import nn

from continuum import ContinuumBlock, ContinuumConv, SegmentedConv2d, SegmentError
from continuum.knobs import segment_sizes

SEGMENTS = [1, 2, 4, 8, "all"]
ORDERS = ["depthwise_first", "pointwise_first"]
MID_ACTS = [None, "relu", "elu"]


@pytest.mark.parametrize("segments,order,mid_act,residual",
                         list(itertools.product(SEGMENTS, ORDERS, MID_ACTS, [True, False])))
def test_block_forward_backward_every_parameter_gets_a_gradient(segments, order, mid_act, residual):
    torch.manual_seed(0)
    block = ContinuumBlock(16, 32, reps=2, stride=2, segments=segments, order=order, mid_act=mid_act,
                           residual=residual)
    x = torch.randn(2, 16, 9, 9, requires_grad=True)
    out = block(x)
    assert out.shape == (2, 32, 5, 5)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def _copy_kernel(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src)


@pytest.mark.usefixtures("native_kernels")
def test_one_segment_depthwise_first_equals_dense_conv_then_pointwise():
    torch.manual_seed(0)
    unit = ContinuumConv(8, 12, 3, segments=1, order="depthwise_first")
    dense, pointwise = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.Conv2d(8, 12, 1, bias=False)
    _copy_kernel(dense.weight, unit.spatial.weight)
    _copy_kernel(pointwise.weight, unit.pointwise.weight)
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(unit(x), pointwise(dense(x)), rtol=0, atol=0)


@pytest.mark.usefixtures("native_kernels")
def test_one_segment_pointwise_first_equals_pointwise_then_dense_conv():
    torch.manual_seed(0)
    unit = ContinuumConv(8, 12, 3, stride=2, segments=1, order="pointwise_first")
    pointwise, dense = nn.Conv2d(8, 12, 1, bias=False), nn.Conv2d(12, 12, 3, stride=2, padding=1, bias=False)
    _copy_kernel(dense.weight, unit.spatial.weight)
    _copy_kernel(pointwise.weight, unit.pointwise.weight)
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(unit(x), dense(pointwise(x)), rtol=0, atol=0)


@pytest.mark.usefixtures("native_kernels")
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
def test_all_segments_equals_timm_separable_conv(stride, dilation):
    torch.manual_seed(0)
    unit = ContinuumConv(8, 16, 3, stride=stride, dilation=dilation, segments="all")
    ref = SeparableConv2d(8, 16, 3, stride=stride, dilation=dilation)
    _copy_kernel(ref.conv_dw.weight, unit.spatial.weight)
    _copy_kernel(ref.conv_pw.weight, unit.pointwise.weight)
    x = torch.randn(2, 8, 11, 11)
    torch.testing.assert_close(unit(x), ref(x), rtol=0, atol=0)


@pytest.mark.usefixtures("native_kernels")
def test_all_segments_with_depth_multiplier_equals_timm_channel_multiplier():
    unit = ContinuumConv(8, 16, 3, segments="all", depth_multiplier=2)
    ref = SeparableConv2d(8, 16, 3, channel_multiplier=2)
    _copy_kernel(ref.conv_dw.weight, unit.spatial.weight)
    _copy_kernel(ref.conv_pw.weight, unit.pointwise.weight)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(unit(x), ref(x), rtol=0, atol=0)


@pytest.mark.usefixtures("native_kernels")
def test_even_segments_equal_native_grouped_conv_with_same_state_dict():
    conv = SegmentedConv2d(16, 32, 3, stride=2, padding=1, segments=4, bias=True)
    ref = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4, bias=True)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 16, 9, 9)
    torch.testing.assert_close(conv(x), ref(x), rtol=0, atol=0)


@pytest.mark.usefixtures("native_kernels")
def test_uneven_segments_equal_per_segment_convs_concatenated():
    torch.manual_seed(0)
    conv = SegmentedConv2d(10, 14, 3, padding=1, segments=3, uneven=True, bias=True)
    assert conv.in_sizes == (4, 3, 3) and conv.out_sizes == (5, 5, 4)
    towers = [nn.Conv2d(i, o, 3, padding=1, bias=True) for i, o in zip(conv.in_sizes, conv.out_sizes)]
    for tower, weight, bias in zip(towers, conv.segment_weights, conv.bias.split(conv.out_sizes)):
        _copy_kernel(tower.weight, weight)
        _copy_kernel(tower.bias, bias)
    x = torch.randn(2, 10, 7, 7)
    expected = torch.cat([t(p) for t, p in zip(towers, x.split(conv.in_sizes, dim=1))], dim=1)
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=0)
    assert sum(p.numel() for p in conv.parameters()) == sum(p.numel() for t in towers for p in t.parameters())


def test_segment_width_is_channels_per_segment():
    assert SegmentedConv2d(64, 64, 3, segment_width=16).segments == 4
    with pytest.raises(SegmentError, match=r"segment_width=24 does not divide 64 channels; valid widths: \[1, 2"):
        SegmentedConv2d(64, 64, 3, segment_width=24)


def test_segment_count_that_does_not_divide_names_channels_and_choices():
    with pytest.raises(ValueError) as err:
        SegmentedConv2d(24, 24, 3, segments=5)
    message = str(err.value)
    assert "segments=5" in message and "in_channels=24" in message
    assert "[1, 2, 3, 4, 6, 8, 12, 24] or 'all'" in message and "uneven=True" in message


def test_block_error_names_the_layer():
    with pytest.raises(SegmentError, match=r"^rep\.4\.spatial: segments=16 does not fit in_channels=24"):
        ContinuumBlock(16, 24, reps=2, segments=16)


@pytest.mark.parametrize("bad", [0, -1, "some", 2.5, True])
def test_invalid_segment_values_are_rejected(bad):
    with pytest.raises(ValueError, match="use an int >= 1 or 'all'"):
        segment_sizes(8, 8, bad)


@pytest.mark.parametrize("channels, geometry, message", [
    ((0, 8), {}, "in_channels=0 is not valid; use an int >= 1"),
    ((8, -4), {}, "out_channels=-4 is not valid"),
    ((8.0, 8), {}, "in_channels=8.0 is not valid"),
    ((8, 8), {"kernel_size": 0}, r"kernel_size=0 is not valid; use an int >= 1 or a \(height, width\) pair"),
    ((8, 8), {"kernel_size": (3,)}, r"kernel_size=\(3,\) is not valid"),
    ((8, 8), {"stride": (1, 0)}, r"stride=\(1, 0\) is not valid"),
    ((8, 8), {"padding": -1}, "padding=-1 is not valid; use an int >= 0"),
    ((8, 8), {"padding": "full"}, "padding='full' is not valid; use an int >= 0, a pair of them, or one of same"),
    ((8, 8), {"padding": "same", "stride": 2}, r"padding='same' needs stride 1, not \(2, 2\)"),
    ((8, 8), {"dilation": 0}, "dilation=0 is not valid"),
    ((8, 8), {"depth_multiplier": 1.5}, "depth_multiplier=1.5 is not valid; use an int >= 1"),
])
def test_channel_counts_and_geometry_are_checked_when_the_layer_is_built(channels, geometry, message):
    """As nn.Conv2d takes them, but refused at construction with the knob's name, not at the first call."""
    if "depth_multiplier" not in geometry:  # ContinuumConv's alone
        with pytest.raises(ValueError, match=message):
            SegmentedConv2d(*channels, **{"kernel_size": 3} | geometry, segments=1)
    if "padding" not in geometry:  # ContinuumConv derives "same" padding from the kernel and dilation
        with pytest.raises(ValueError, match=message):
            ContinuumConv(*channels, **{"kernel_size": 3} | geometry, segments=1)


def test_numpy_whole_numbers_and_named_padding_are_taken_as_nn_conv2d_takes_them():
    conv = SegmentedConv2d(np.int64(8), np.int64(8), np.int64(3), padding=np.int64(1), segments=np.int64(2))
    assert type(conv.segments) is int and conv.segments == 2
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv(torch.randn(1, 8, 5, 5)).shape[-1] == 5
    assert SegmentedConv2d(8, 8, 3, padding="valid", segments=2)(torch.randn(1, 8, 5, 5)).shape[-1] == 3


@pytest.mark.parametrize("value, residual", [(False, False), ("no", False), ("off", False), (True, True), ("on", True)])
def test_residual_takes_switch_words_and_off_means_off(value, residual):
    block = ContinuumBlock(8, 16, stride=2, residual=value)
    assert block.residual is residual and (block.skip is None) is (not residual)


@pytest.mark.parametrize("knobs, message", [({"residual": "maybe"}, "residual='maybe' is not valid; use True or False"),
                                            ({"uneven": "sometimes"}, "uneven='sometimes' is not valid"),
                                            ({"reps": 0}, "reps=0 is not valid; use an int >= 1"),
                                            ({"reps": 1.5}, "reps=1.5 is not valid"),
                                            ({"stride": 0}, "stride=0 is not valid; use an int >= 1"),
                                            ({"stride": (2, 2)}, r"stride=\(2, 2\) is not valid"),
                                            ({"in_channels": 0}, "in_channels=0 is not valid")])
def test_block_switches_and_counts_are_checked(knobs, message):
    with pytest.raises(ValueError, match=message):
        ContinuumBlock(**{"in_channels": 8, "out_channels": 8} | knobs)


def test_uneven_no_is_off():
    with pytest.raises(SegmentError, match="segments=3 does not fit"):
        SegmentedConv2d(8, 8, 3, segments=3, uneven="no")
    assert SegmentedConv2d(8, 8, 3, segments=3, uneven="yes").in_sizes == (3, 3, 2)


@pytest.mark.parametrize("value", ["no", "off", False])
def test_bias_no_is_off_in_both_layers(value):
    assert SegmentedConv2d(8, 8, 3, segments=2, bias=value).bias is None
    assert ContinuumConv(8, 8, bias=value).pointwise.bias is None
    assert ContinuumConv(8, 8, bias="yes").pointwise.bias is not None
    with pytest.raises(ValueError, match="bias='perhaps' is not valid; use True or False"):
        SegmentedConv2d(8, 8, 3, bias="perhaps")


def test_all_needs_out_multiple_of_in():
    with pytest.raises(SegmentError, match=r"segments='all' needs out_channels \(12\) to be a multiple"):
        SegmentedConv2d(8, 12, 3, segments="all")


def test_unknown_order_activation_and_norm_are_clear_errors():
    with pytest.raises(ValueError, match="order='sideways' is not valid; choose one of depthwise_first"):
        ContinuumConv(8, 8, order="sideways")
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        ContinuumConv(8, 8, mid_act="swishy")
    with pytest.raises(ValueError, match="unknown norm layer 'fancynorm'"):
        ContinuumBlock(8, 8, norm_layer="fancynorm")
    with pytest.raises(ValueError, match="order=None is not valid; choose one of depthwise_first"):
        ContinuumConv(8, 8, order=None)
    with pytest.raises(ValueError, match="unknown activation 3"):
        ContinuumConv(8, 8, mid_act=3)


def test_wrong_input_channels_is_a_clear_error():
    with pytest.raises(ValueError, match="expects 8 input channels, got input of shape \\(1, 4, 5, 5\\)"):
        SegmentedConv2d(8, 8, 3, segments=2)(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="expects an N x C x H x W \\(or C x H x W\\) input, got shape \\(8, 5\\)"):
        SegmentedConv2d(8, 8, 3, segments=2)(torch.randn(8, 5))


@pytest.mark.parametrize("segments", [2, 3, "all"])
def test_an_unbatched_input_is_taken_as_nn_conv2d_takes_it(segments):
    conv = SegmentedConv2d(8, 8, 3, padding=1, segments=segments, uneven=True)
    x = torch.randn(8, 5, 6)  # C x H x W
    assert torch.equal(conv(x), conv(x.unsqueeze(0)).squeeze(0)) and conv(x).shape == (8, 5, 6)
    unit = ContinuumConv(8, 16, segments=segments, uneven=True)
    assert unit(x).shape == (16, 5, 6)


def _output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1)
    for p in module.parameters():
        nn.init.normal_(p)
    module.eval()
    return module(x)


@pytest.mark.parametrize("option,value", [
    ("segments", 4), ("order", "pointwise_first"), ("mid_act", "relu"), ("residual", False),
    ("mid_norm", "batchnorm2d"), ("depth_multiplier", 2), ("start_with_act", False), ("grow_first", False),
    ("act_layer", "elu"),
])
def test_every_block_option_changes_the_output(option, value):
    x = torch.randn(2, 8, 6, 6)
    base = ContinuumBlock(8, 16, reps=2, stride=1)
    changed = ContinuumBlock(8, 16, reps=2, stride=1, **{option: value})
    assert str(base) != str(changed)
    assert not torch.allclose(_output(base, x), _output(changed, x))


def test_residual_identity_when_shapes_match_projection_when_not():
    assert ContinuumBlock(8, 8).skip is None
    block = ContinuumBlock(8, 16, stride=2)
    assert isinstance(block.skip, nn.Conv2d) and block.skip.stride == (2, 2)
    assert ContinuumBlock(8, 16, stride=2, residual=False).skip is None


def test_residual_false_drops_the_shortcut_exactly():
    torch.manual_seed(0)
    with_res = ContinuumBlock(8, 8)
    without = ContinuumBlock(8, 8, residual=False)
    without.load_state_dict(with_res.state_dict())
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(with_res(x), without(x) + x)


def test_first_activation_does_not_modify_the_input():
    x = torch.randn(2, 8, 5, 5)
    before = x.clone()
    ContinuumBlock(8, 8)(x)
    torch.testing.assert_close(x, before, rtol=0, atol=0)
