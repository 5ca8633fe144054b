"""The models: the paper's Xception exactly, its knobs, timm registration, legacy weights, the small family."""

import pytest
import timm
import torch
from torch import nn

import continuum  # noqa: F401  (registers the models with timm)
from continuum import ContinuumConv, SegmentError
from continuum.models import ContinuumSmall, ContinuumXception, PAPER_PARAMS, load_legacy_xception_weights


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def xception() -> ContinuumXception:
    return timm.create_model("continuum_xception")


def test_xception_has_the_papers_parameter_count(xception):
    assert n_params(xception) == 22_855_952 == PAPER_PARAMS["continuum_xception"]


def test_xception_shapes_at_299(xception):
    xception.eval()
    with torch.no_grad():
        features = xception.forward_features(torch.randn(1, 3, 299, 299))
    assert features.shape == (1, 2048, 10, 10)
    assert xception.block3(torch.randn(1, 256, 74, 74)).shape == (1, 728, 37, 37)


def test_inception_v3_baseline_is_timms_without_aux_tower():
    model = timm.create_model("continuum_inception_v3", num_classes=1000)
    assert n_params(model) == 23_834_568
    assert not getattr(model, "aux_logits", False)


def test_xception_every_separable_conv_is_a_continuum_conv(xception):
    convs = [m for m in xception.modules() if isinstance(m, ContinuumConv)]
    assert len(convs) == 2 * 3 + 3 * 8 + 2 + 2
    assert all(c.spatial.segments == c.spatial.in_channels for c in convs)


def test_timm_create_model_passes_knobs_and_drops_none(xception):
    model = timm.create_model("continuum_xception", num_classes=10, segments=8, order="pointwise_first",
                              mid_act="elu", residual=False, drop_rate=0.5, in_chans=None)
    assert model.num_classes == 10 and model.in_chans == 3
    unit = model.block5.rep[1]
    assert unit.order == "pointwise_first" and unit.spatial.segments == 8
    assert isinstance(unit.mid_act, nn.ELU)
    assert not model.block5.residual and model.head.drop.p == 0.5


def test_knobs_per_flow():
    model = ContinuumXception(num_classes=10, segments={"entry": 4, "middle": 8, "exit": "all"},
                              residual={"default": True, "middle": False}, mid_act={"default": None, "exit": "relu"})
    assert model.block2.rep[1].spatial.segments == 4
    assert model.block4.rep[1].spatial.segments == 8 and not model.block4.residual
    assert model.block12.residual and model.conv4.spatial.segments == 1536
    assert isinstance(model.conv3.mid_act, nn.ReLU) and isinstance(model.block4.rep[1].mid_act, nn.Identity)


def test_per_flow_errors():
    with pytest.raises(ValueError, match=r"segments: unknown part\(s\) \['middel'\]"):
        ContinuumXception(segments={"middel": 4, "default": 1})
    with pytest.raises(ValueError, match=r"order: no value for \['exit'\]"):
        ContinuumXception(order={"entry": "depthwise_first", "middle": "depthwise_first"})


def test_xception_invalid_segment_count_names_layer_and_choices():
    with pytest.raises(SegmentError, match=r"^block3\.rep\.4\.spatial: segments=16 does not fit in_channels=728.*"
                                           r"valid choices: one of \[1, 2, 4, 7, 8, 13"):
        timm.create_model("continuum_xception", segments=16)


@pytest.mark.parametrize("knobs, message", [
    ({"middle_blocks": -1}, "middle_blocks=-1 is not valid; use an int >= 0"),
    ({"middle_blocks": 2.5}, "middle_blocks=2.5 is not valid"),
    ({"fc_dims": (256, 0)}, r"fc_dims\[1\]=0 is not valid; use an int >= 1"),
])
def test_xception_refuses_block_and_fc_counts_that_build_no_net(knobs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model("continuum_xception", **knobs)


def test_xception_uneven_segments_and_segment_width():
    model = ContinuumXception(num_classes=10, segments=16, uneven=True, middle_blocks=1)
    assert model.block4.rep[1].spatial.segments == 16 and not model.block4.rep[1].spatial.even
    model = ContinuumXception(num_classes=10, segment_width=8, middle_blocks=1)
    assert model.block4.rep[1].spatial.segments == 91


def test_dropout_really_applies():
    model = ContinuumSmall(num_classes=10, drop_rate=0.5).train()
    x = torch.randn(4, 1, 28, 28)
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_timm_interface(xception):
    assert xception.num_features == 2048 and xception.get_classifier().out_features == 1000
    model = timm.create_model("continuum_small", num_classes=10)
    model.reset_classifier(3)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    model.reset_classifier(0)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 256)
    assert "continuum_xception" in timm.list_models("continuum_*")


@pytest.mark.parametrize("segments", [1, 4, "all"])
def test_small_family_traces_with_torch_fx(segments):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = timm.create_model("continuum_small", segments=segments).eval()
    nodes = get_graph_node_names(model)[1]
    extractor = create_feature_extractor(model, {nodes[-1]: "logits"})
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)["logits"], model(x))


@pytest.mark.parametrize("name, knobs", [("continuum_small", {"segments": 4, "strides": (2, 2)}),
                                         ("continuum_small", {"segments": 3, "uneven": True, "strides": (2, 1)}),
                                         ("continuum_inception_small", {})])
def test_models_compile_with_torchscript_and_give_the_same_logits(name, knobs):
    model = timm.create_model(name, widths=(32, 64), depths=(1, 1), **knobs).eval()
    if "uneven" in knobs:
        assert hasattr(model.stages.stage1[0].rep[0].spatial, "segment_weights")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))


@pytest.mark.parametrize("name, knobs, size", [
    ("continuum_small", {"segments": 4, "residual": True, "mid_act": "relu", "order": "pointwise_first"}, 28),
    ("continuum_small", {"segments": 3, "uneven": True}, 28),
    ("continuum_inception_small", {}, 28),
    ("continuum_xception", {"segments": 4}, 71)])
def test_models_compile_into_one_graph(name, knobs, size, dynamo_counters):
    """torch.compile sees the whole model: no layer's checks break the graph (dynamo alone, no code generation)."""
    model = timm.create_model(name, **knobs).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3 if size == 71 else 1, size, size).contiguous(memory_format=torch.channels_last)
    torch.compile(model)(x).sum().backward()
    assert dict(dynamo_counters["frames"]) == {"total": 1, "ok": 1} and not dynamo_counters["graph_break"]


def test_a_trunk_out_of_the_children_order_is_refused():
    class Reordered(ContinuumSmall):
        def place(self, device, dtype):
            self.trunk = (*self.trunk[1:], self.trunk[0])
            super().place(device, dtype)

    with pytest.raises(TypeError, match=r"Reordered.trunk runs through \['stages', 'final_act', 'stem'\]"):
        Reordered()


def test_wrong_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"ContinuumSmall expects N x 1 x H x W input, got shape \(2, 3, 28, 28\)"):
        ContinuumSmall()(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="ContinuumSmall expects floating-point images, got torch.uint8; convert"):
        ContinuumSmall()(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))


def _randomise_norms(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.1, 0.1)


@pytest.mark.usefixtures("native_kernels")
def test_legacy_xception_weights_give_timms_logits():
    torch.manual_seed(0)
    ref = timm.create_model("legacy_xception", num_classes=7).eval()
    _randomise_norms(ref)
    model = ContinuumXception(num_classes=7).eval()
    load_legacy_xception_weights(model, ref.state_dict())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_legacy_weights_refuse_a_non_default_model():
    ref = timm.create_model("legacy_xception")
    with pytest.raises(ValueError, match=r"fit only the paper's Xception.*\['block1.rep.0'"):
        load_legacy_xception_weights(ContinuumXception(mid_act="relu"), ref.state_dict())
    with pytest.raises(ValueError, match=r"fit only the paper's Xception.*\['block1'"):
        load_legacy_xception_weights(ContinuumXception(residual=False), ref.state_dict())
    with pytest.raises(ValueError, match=r"shape mismatch \['head.fc.bias', 'head.fc.weight'\]"):
        load_legacy_xception_weights(ContinuumXception(num_classes=10), ref.state_dict())


SMALL_SEGMENTS = [1, 2, 4, 8, 16, 32, "all"]


@pytest.mark.parametrize("order", ["depthwise_first", "pointwise_first"])
@pytest.mark.parametrize("segments", SMALL_SEGMENTS)
def test_small_family_defaults_accept_every_segment_count(segments, order):
    model = timm.create_model("continuum_small", segments=segments, order=order)
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_small_family_shapes_channels_and_knobs():
    model = timm.create_model("continuum_small", in_chans=3, num_classes=100, input_size=(32, 32),
                              widths=(32, 64), depths=(2, 1), strides=(1, 2), segments=[4, "all"],
                              residual=[True, False])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert len(model.stages.stage1) == 2 and model.stages.stage1[0].rep[0].spatial.segments == 4
    assert not model.stages.stage2[0].residual
    wide = timm.create_model("continuum_small", width_mult=1.5)
    assert wide.widths == (96, 192, 384) and all(w % 32 == 0 for w in wide.widths)
    with pytest.raises(ValueError, match="one entry per stage"):
        ContinuumSmall(widths=(32, 64), depths=(1,), strides=(2, 2))


SIZES_THAT_BUILD_NO_NET = [
    ({"width_mult": float("nan")}, "width_mult=nan is not valid; use a positive number"),
    ({"width_mult": "big"}, "width_mult='big' is not valid"),
    ({"width_mult": -1}, "width_mult=-1 is not valid"),
    ({"width_divisor": 0}, "width_divisor=0 is not valid; use an int >= 1"),
    ({"stem_width": 0}, "stem_width=0 is not valid"),
    ({"widths": (64, 0, 256)}, r"widths\[1\]=0 is not valid"),
]


@pytest.mark.parametrize("name, knobs, message", [
    *(("continuum_small", knobs, message) for knobs, message in SIZES_THAT_BUILD_NO_NET),
    ("continuum_small", {"depths": (1, 0, 1)}, r"depths\[1\]=0 is not valid; use an int >= 1"),
    ("continuum_small", {"strides": (2, 2.5, 2)}, r"strides\[1\]=2.5 is not valid"),
    *(("continuum_inception_small", knobs, message) for knobs, message in SIZES_THAT_BUILD_NO_NET),
    ("continuum_inception_small", {"depths": (1, -1, 1)}, r"depths\[1\]=-1 is not valid; use an int >= 0"),
])
def test_the_small_families_refuse_sizes_that_build_no_net(name, knobs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model(name, **knobs)


def test_small_family_every_parameter_gets_a_gradient():
    model = timm.create_model("continuum_small", segments=4, mid_act="relu")
    model(torch.randn(4, 1, 28, 28)).logsumexp(1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_small_family_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("continuum_small", pretrained=True)


def test_inception_small_is_towers_of_regular_convs_without_shortcuts():
    model = timm.create_model("continuum_inception_small")
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.groups == 1 for c in convs)
    assert not any(isinstance(m, ContinuumConv) for m in model.modules())
    module = model.stages.stage2[1]  # reduction, then one Inception module
    assert module.out_channels == 128 and model.stages.stage2[0].out_channels == 128
    cifar = timm.create_model("continuum_inception_small", in_chans=3, num_classes=100, width_mult=0.5)
    assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert n_params(cifar) < n_params(model)


def test_inception_small_rejects_continuum_knobs_and_pretrained():
    with pytest.raises(TypeError):
        timm.create_model("continuum_inception_small", segments=4)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("continuum_inception_small", pretrained=True)


def test_pretrained_xception_loads_legacy_weights_through_timms_filter(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("legacy_xception").eval()
    _randomise_norms(ref)
    torch.save(ref.state_dict(), tmp_path / "legacy.pth")
    model = timm.create_model("continuum_xception", pretrained=True, num_classes=5, in_chans=1,
                              pretrained_cfg_overlay={"file": str(tmp_path / "legacy.pth")})
    assert torch.equal(model.block4.rep[1].spatial.weight, ref.block4.rep[1].conv1.weight)
    assert torch.equal(model.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))  # timm adapts the first conv
    assert model.get_classifier().out_features == 5 and model.in_chans == 1
    with pytest.raises(ValueError, match="fit only the paper's Xception"):
        timm.create_model("continuum_xception", pretrained=True, segments=8,
                          pretrained_cfg_overlay={"file": str(tmp_path / "legacy.pth")})


CONTINUUM_MODELS = ["continuum_small", "continuum_inception_small", "continuum_xception"]


@pytest.mark.parametrize("name", CONTINUUM_MODELS)
def test_features_only_and_intermediates_follow_feature_info(name):
    size = 28 if "small" in name else 64
    x = torch.randn(2, timm.create_model(name).in_chans, size, size)
    model = timm.create_model(name).eval()
    with torch.no_grad():
        final, levels = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        features = timm.create_model(name, features_only=True).eval()
        features.load_state_dict(model.state_dict(), strict=False)
        extracted = features(x)
    channels = [info["num_chs"] for info in model.feature_info]
    assert [level.shape[1] for level in levels] == channels == features.feature_info.channels()
    for level, info in zip(levels, model.feature_info):  # Xception's first convs are unpadded: 64 -> 31 -> 29
        assert size / (2 * info["reduction"]) < level.shape[-1] <= -(-size // info["reduction"])
    assert len(extracted) == len(levels)
    last_two = timm.create_model(name, features_only=True, out_indices=(-2, -1))
    assert last_two.feature_info.channels() == channels[-2:]


@pytest.mark.parametrize("name", CONTINUUM_MODELS)
def test_timm_head_interface_and_factory_placement(name):
    model = timm.create_model(name, num_classes=0, global_pool="", device="meta", dtype=torch.float64)
    assert all(p.is_meta and p.dtype == torch.float64 for p in model.parameters())
    x = torch.randn(1, model.in_chans, 64, 64, device="meta", dtype=torch.float64)
    assert model(x).ndim == 4 and model(x).shape[1] == model.num_features == model.head_hidden_size
    model.reset_classifier(3, "avg")
    assert model(x).shape == (1, 3) and model.get_classifier().weight.is_meta
    with pytest.raises(ValueError, match="global_pool='' .* needs num_classes=0"):
        timm.create_model(name, num_classes=10, global_pool="")
    with pytest.raises(TypeError):
        timm.create_model(name, not_a_model_arg=1)


def test_head_hidden_size_is_after_the_fc_layers():
    model = timm.create_model("continuum_xception", fc_dims=(512,), num_classes=0)
    assert model.num_features == 2048 and model.head_hidden_size == 512
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 512)


def test_pruned_model_ends_at_the_level_asked_for():
    model = timm.create_model("continuum_small").eval()
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        levels = model.forward_intermediates(x, intermediates_only=True)
        assert model.prune_intermediate_layers([1]) == [1]
        torch.testing.assert_close(model.forward_features(x), levels[1])
    assert model.num_classes == 0 and model.head.global_pool == ""
