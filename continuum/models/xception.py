"""The paper's Xception (figure 5), every separable conv a :class:`ContinuumConv`.

At the defaults (``segments="all"``, ``order="depthwise_first"``, ``mid_act=None``, ``residual=True``) it is the
paper's network: 22,855,952 parameters at 1000 classes, and timm's ``legacy_xception`` weights load onto it
(:func:`load_legacy_xception_weights`). Every knob can be set for the whole net or per flow
(``{"entry": ..., "middle": ..., "exit": ...}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model
from torch import nn

from continuum.block import ContinuumBlock, ContinuumConv, LayerSpec, create_act, create_norm
from continuum.knobs import Segments, in_layer, parse_whole, spread
from continuum.models.base import ClassifierHead, ContinuumClassifier, build

FLOWS = ("entry", "middle", "exit")


@dataclass(frozen=True)
class BlockSpec:
    """One residual block of an architecture given as data.

    Args:
        name: attribute name of the block.
        in_channels: input channels.
        out_channels: output channels.
        reps: separable units in the block.
        stride: downsampling factor.
        flow: the part of the net whose knobs apply (``"entry"``, ``"middle"``, ``"exit"`` or a stage name).
        start_with_act: activation before the first unit.
        grow_first: change width in the first unit rather than the last.
    """

    name: str
    in_channels: int
    out_channels: int
    reps: int
    stride: int
    flow: str
    start_with_act: bool = True
    grow_first: bool = True


def xception_blocks(middle_blocks: int = 8) -> list[BlockSpec]:
    """The residual blocks of the paper's figure 5: three entry, ``middle_blocks`` middle, one exit."""
    blocks = [
        BlockSpec("block1", 64, 128, 2, 2, "entry", start_with_act=False),
        BlockSpec("block2", 128, 256, 2, 2, "entry"),
        BlockSpec("block3", 256, 728, 2, 2, "entry"),
    ]
    blocks += [BlockSpec(f"block{4 + i}", 728, 728, 3, 1, "middle") for i in range(middle_blocks)]
    blocks.append(BlockSpec(f"block{4 + middle_blocks}", 728, 1024, 2, 2, "exit", grow_first=False))
    return blocks


def feature_levels(block_names: list[str]) -> list[dict[str, Any]]:
    """timm's ``feature_info``. At 299 px: act2 N x 64 x 147 x 147, block1 N x 128 x 74 x 74, block2
    N x 256 x 37 x 37, the middle flow's last block N x 728 x 19 x 19, act4 (after conv3 and conv4, the exit flow's
    N x 1536 and 2048 x 10 x 10) N x 2048 x 10 x 10."""
    return [dict(num_chs=64, reduction=2, module="act2"), dict(num_chs=128, reduction=4, module="block1"),
            dict(num_chs=256, reduction=8, module="block2"), dict(num_chs=728, reduction=16, module=block_names[-2]),
            dict(num_chs=2048, reduction=32, module="act4")]


class ContinuumXception(ContinuumClassifier):
    """Xception (Chollet, CVPR 2017) with the continuum's knobs on every separable conv.

    Args:
        num_classes: classes of the classifier (0: none, ``forward`` returns pooled features).
        in_chans: input image channels.
        drop_rate: dropout before the classifier (the paper uses 0.5 on ImageNet).
        segments: segments of every spatial conv: int, ``"all"``, or a per-flow dict.
        order: ``"depthwise_first"`` / ``"pointwise_first"``, or a per-flow dict.
        mid_act: activation between the two ops of each unit (``None``: the paper's), or a per-flow dict.
        residual: shortcuts on the residual blocks, or a per-flow dict.
        segment_width: channels per segment instead of a count (int or per-flow dict); overrides ``segments``.
        kernel_size: kernel of the spatial convs (3 in the paper; odd, "same" padded), or a per-flow dict.
        uneven: allow segment counts that do not divide a layer's channels (near-equal segments).
        act_layer: activation between units.
        norm_layer: norm after every conv (PyTorch ``BatchNorm2d`` defaults, as timm's port).
        mid_norm: norm between the two ops of each unit.
        depth_multiplier: spatial outputs per spatial input channel.
        middle_blocks: repeats of the middle flow (8 in the paper).
        fc_dims: widths of optional fully connected layers before the classifier.
        global_pool: ``"avg"``, or ``""`` to return the feature map (with ``num_classes=0``).
        device: where to put the parameters (timm's factory argument).
        dtype: their dtype.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        segments: Segments | Mapping[str, Segments] = "all",
        order: str | Mapping[str, str] = "depthwise_first",
        mid_act: LayerSpec | Mapping[str, LayerSpec] = None,
        residual: bool | Mapping[str, bool] = True,
        segment_width: int | Mapping[str, int] | None = None,
        kernel_size: int | Mapping[str, int] = 3,
        uneven: bool = False,
        act_layer: LayerSpec = "relu",
        norm_layer: LayerSpec = "batchnorm2d",
        mid_norm: LayerSpec = None,
        depth_multiplier: int = 1,
        middle_blocks: int = 8,
        fc_dims: tuple[int, ...] = (),
        global_pool: str = "avg",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_classes, in_chans)
        middle_blocks = parse_whole("middle_blocks", middle_blocks, 0)
        fc_dims = tuple(parse_whole(f"fc_dims[{i}]", dim) for i, dim in enumerate(fc_dims))
        given = {"segments": segments, "order": order, "mid_act": mid_act, "segment_width": segment_width,
                 "kernel_size": kernel_size}
        knobs = {name: spread(value, FLOWS, name) for name, value in given.items()}
        residuals = spread(residual, FLOWS, "residual")
        shared = {"uneven": uneven, "mid_norm": mid_norm, "depth_multiplier": depth_multiplier}

        def unit_knobs(flow: str) -> dict[str, Any]:
            return {key: per_flow[flow] for key, per_flow in knobs.items()} | shared

        self.conv1 = nn.Conv2d(in_chans, 32, 3, 2, 0, bias=False)  # valid padding: 299 -> 149
        self.bn1 = create_norm(norm_layer, 32)
        self.act1 = create_act(act_layer, inplace=True)
        self.conv2 = nn.Conv2d(32, 64, 3, bias=False)  # 149 -> 147
        self.bn2 = create_norm(norm_layer, 64)
        self.act2 = create_act(act_layer, inplace=True)
        self.block_names = []
        for spec in xception_blocks(middle_blocks):
            with in_layer(spec.name):
                block = ContinuumBlock(
                    spec.in_channels, spec.out_channels, spec.reps, spec.stride, residual=residuals[spec.flow],
                    start_with_act=spec.start_with_act, grow_first=spec.grow_first, act_layer=act_layer,
                    norm_layer=norm_layer, **unit_knobs(spec.flow))
            self.add_module(spec.name, block)
            self.block_names.append(spec.name)
        with in_layer("conv3"):
            self.conv3 = ContinuumConv(1024, 1536, **unit_knobs("exit"))
        self.bn3 = create_norm(norm_layer, 1536)
        self.act3 = create_act(act_layer, inplace=True)
        with in_layer("conv4"):
            self.conv4 = ContinuumConv(1536, 2048, **unit_knobs("exit"))
        self.bn4 = create_norm(norm_layer, 2048)
        self.act4 = create_act(act_layer, inplace=True)
        self.head = ClassifierHead(2048, num_classes, drop_rate, fc_dims, act_layer, global_pool)
        self.trunk = ("conv1", "bn1", "act1", "conv2", "bn2", "act2", *self.block_names, "conv3", "bn3", "act3",
                      "conv4", "bn4", "act4")
        self.feature_info = feature_levels(self.block_names)
        self.place(device, dtype)


def legacy_xception_filter(state_dict: Mapping[str, torch.Tensor], model: ContinuumXception
                           ) -> dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn`` for ``legacy_xception`` weights: their keys renamed to the model's.

    Raises:
        ValueError: the model is not the paper's Xception (the weights fit no other).
    """
    non_default = _non_default_units(model)
    if non_default:
        raise ValueError(
            f"legacy_xception weights fit only the paper's Xception (segments='all', order='depthwise_first', "
            f"mid_act=None, mid_norm=None, residual=True); these layers differ: {non_default[:5]}")
    # nested conv1 = the depthwise conv of a SeparableConv2d; fc = the classifier
    return {("head." + key if key.startswith("fc.") else key.replace(".conv1.", ".spatial.")): value
            for key, value in state_dict.items()}


def _non_default_units(model: ContinuumXception) -> list[str]:
    problems = []
    for name, module in model.named_modules():
        if isinstance(module, ContinuumConv):
            spatial = module.spatial
            depthwise = spatial.segments == spatial.in_channels == spatial.out_channels
            if module.order != "depthwise_first" or not depthwise or not isinstance(module.mid_act, nn.Identity) \
                    or not isinstance(module.mid_norm, nn.Identity) or spatial.kernel_size != (3, 3):
                problems.append(name)
        elif isinstance(module, ContinuumBlock) and not module.residual:
            problems.append(name)
    return problems


def load_legacy_xception_weights(model: ContinuumXception, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load timm ``legacy_xception`` weights so that ``model`` then gives timm's logits.

    Users with network access get the ImageNet weights this way::

        ref = timm.create_model("legacy_xception", pretrained=True)
        load_legacy_xception_weights(model, ref.state_dict())

    Args:
        model: a :class:`ContinuumXception` at the paper's defaults (depthwise, depthwise-first, no intermediate
            activation or norm, residual); ``num_classes`` must match the checkpoint's classifier.
        state_dict: the ``legacy_xception`` state dict.

    Raises:
        ValueError: the model is not at the defaults, or keys/shapes do not match (names the first few).
    """
    renamed = legacy_xception_filter(state_dict, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(renamed))
    unexpected = sorted(set(renamed) - set(own))
    mismatched = sorted(k for k in set(own) & set(renamed) if own[k].shape != renamed[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError(f"state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shape mismatch {mismatched[:5]} (a different num_classes? reset_classifier first)")
    model.load_state_dict(renamed)


default_cfgs = generate_default_cfgs({
    "continuum_xception.tf_in1k": get_pretrained_cfg("legacy_xception").to_dict() | {"classifier": "head.fc"},
})


@register_model
def continuum_xception(pretrained: bool = False, **kwargs: Any) -> ContinuumXception:
    """Xception with the continuum knobs; ``pretrained=True`` loads timm's ``legacy_xception`` ImageNet weights
    (network access needed; the classifier is loaded only when ``num_classes`` is 1000)."""
    return build(ContinuumXception, "continuum_xception", pretrained, pretrained_filter_fn=legacy_xception_filter,
                 **kwargs)
