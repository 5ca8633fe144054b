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
from timm.models import register_model
from torch import nn

from continuum.block import ContinuumBlock, ContinuumConv, LayerSpec, create_act, create_norm, in_layer
from continuum.config import Segments, spread
from continuum.models.base import ClassifierHead, ContinuumClassifier, model_kwargs

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
        uneven: allow segment counts that do not divide a layer's channels (near-equal segments).
        act_layer: activation between units.
        norm_layer: norm after every conv (PyTorch ``BatchNorm2d`` defaults, as timm's port).
        mid_norm: norm between the two ops of each unit.
        depth_multiplier: spatial outputs per spatial input channel.
        middle_blocks: repeats of the middle flow (8 in the paper).
        fc_dims: widths of optional fully connected layers before the classifier.
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
        uneven: bool = False,
        act_layer: LayerSpec = "relu",
        norm_layer: LayerSpec = "batchnorm2d",
        mid_norm: LayerSpec = None,
        depth_multiplier: int = 1,
        middle_blocks: int = 8,
        fc_dims: tuple[int, ...] = (),
    ) -> None:
        super().__init__(num_classes, in_chans, input_size=(in_chans, 299, 299))
        knobs = {
            "segments": spread(segments, FLOWS, "segments"),
            "order": spread(order, FLOWS, "order"),
            "mid_act": spread(mid_act, FLOWS, "mid_act"),
            "segment_width": spread(segment_width, FLOWS, "segment_width"),
        }
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
            self.conv3 = ContinuumConv(1024, 1536, 3, **unit_knobs("exit"))
        self.bn3 = create_norm(norm_layer, 1536)
        self.act3 = create_act(act_layer, inplace=True)
        with in_layer("conv4"):
            self.conv4 = ContinuumConv(1536, 2048, 3, **unit_knobs("exit"))
        self.bn4 = create_norm(norm_layer, 2048)
        self.act4 = create_act(act_layer, inplace=True)
        self.head = ClassifierHead(2048, num_classes, drop_rate, tuple(fc_dims), act_layer)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))  # N x 32 x 149 x 149 (at 299 px)
        x = self.act2(self.bn2(self.conv2(x)))  # N x 64 x 147 x 147
        for name in self.block_names:
            x = getattr(self, name)(x)  # entry: N x 728 x 19 x 19; middle keeps it; exit: N x 1024 x 10 x 10
        x = self.act3(self.bn3(self.conv3(x)))  # N x 1536 x 10 x 10
        return self.act4(self.bn4(self.conv4(x)))  # N x 2048 x 10 x 10


def _legacy_key(key: str) -> str:
    """Name of a ``legacy_xception`` state-dict entry in :class:`ContinuumXception`."""
    if key.startswith("fc."):
        return "head." + key
    return key.replace(".conv1.", ".spatial.")  # nested conv1 = the depthwise conv of a SeparableConv2d


def _non_default_units(model: ContinuumXception) -> list[str]:
    problems = []
    for name, module in model.named_modules():
        if isinstance(module, ContinuumConv):
            spatial = module.spatial
            depthwise = spatial.segments == spatial.in_channels == spatial.out_channels
            if module.order != "depthwise_first" or not depthwise or not isinstance(module.mid_act, nn.Identity) \
                    or not isinstance(module.mid_norm, nn.Identity):
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
    non_default = _non_default_units(model)
    if non_default:
        raise ValueError(
            f"legacy_xception weights fit only the paper's Xception (segments='all', order='depthwise_first', "
            f"mid_act=None, mid_norm=None, residual=True); these layers differ: {non_default[:5]}")
    renamed = {_legacy_key(k): v for k, v in state_dict.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(renamed))
    unexpected = sorted(set(renamed) - set(own))
    mismatched = sorted(k for k in set(own) & set(renamed) if own[k].shape != renamed[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError(f"state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shape mismatch {mismatched[:5]} (a different num_classes? reset_classifier first)")
    model.load_state_dict(renamed)


@register_model
def continuum_xception(pretrained: bool = False, **kwargs: Any) -> ContinuumXception:
    """Xception with the continuum knobs; ``pretrained=True`` loads timm's ``legacy_xception`` ImageNet weights
    (network access needed; the classifier is loaded only when ``num_classes`` is 1000)."""
    model = ContinuumXception(**model_kwargs(kwargs))
    if pretrained:
        import timm

        weights = timm.create_model("legacy_xception", pretrained=True).state_dict()
        if model.num_classes != 1000:
            classifier = model.get_classifier()
            weights = {k: v for k, v in weights.items() if not k.startswith("fc.")}
            weights |= {f"fc.{k}": v for k, v in classifier.state_dict().items()}
        load_legacy_xception_weights(model, weights)
    return model
