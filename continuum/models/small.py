"""A small Xception-style family for 28–32 px images (Fashion-MNIST, CIFAR), the sweep's default model.

stem conv -> stages of :class:`ContinuumBlock` (each stage downsamples by its stride) -> act -> head.
Default widths are multiples of 32, so segments 1, 2, 4, 8, 16, 32 and ``"all"`` are valid in every layer.
Every knob can be one value or one per stage (a list, or a dict keyed ``stage1``, ``stage2``, ...).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from timm.layers import make_divisible
from timm.models import generate_default_cfgs, register_model
from torch import nn

from continuum.block import ContinuumBlock, LayerSpec, create_act, create_norm
from continuum.knobs import in_layer, spread
from continuum.models.base import ClassifierHead, ContinuumClassifier, build, check_sizes, pretrained_config

PerStage = Any
"""One value for every stage, a sequence with one value per stage, or a dict keyed by stage name."""


class ContinuumSmall(ContinuumClassifier):
    """Xception-style net for small images with width, depth and stage knobs.

    Args:
        num_classes: classes (0: none).
        in_chans: image channels (1 for Fashion-MNIST, 3 for CIFAR).
        drop_rate: dropout before the classifier.
        stem_width: channels of the stem conv.
        widths: output channels of each stage.
        depths: residual blocks per stage (or one count for every stage).
        strides: downsampling factor of each stage's first block.
        reps: separable units per block.
        width_mult: scales ``stem_width`` and ``widths``; results are rounded to ``width_divisor``.
        width_divisor: every width is made a multiple of it (keeps segment counts valid after scaling).
        segments: segments of every spatial conv, per stage or one value.
        order: ``"depthwise_first"`` / ``"pointwise_first"``, per stage or one value.
        mid_act: activation between the two ops of each unit, per stage or one value.
        residual: shortcuts, per stage or one value.
        segment_width: channels per segment instead of a count, per stage or one value.
        kernel_size: kernel of the spatial convs (odd, "same" padded), per stage or one value.
        uneven: allow segment counts that do not divide a layer's channels (near-equal segments).
        act_layer: activation between units.
        norm_layer: norm after every conv.
        mid_norm: norm between the two ops of each unit.
        depth_multiplier: spatial outputs per spatial input channel.
        global_pool: ``"avg"``, or ``""`` to return the feature map (with ``num_classes=0``).
        device: where to put the parameters (timm's factory argument).
        dtype: their dtype.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        drop_rate: float = 0.0,
        stem_width: int = 32,
        widths: Sequence[int] = (64, 128, 256),
        depths: int | Sequence[int] = (1, 1, 1),
        strides: Sequence[int] = (2, 2, 2),
        reps: int = 2,
        width_mult: float = 1.0,
        width_divisor: int = 32,
        segments: PerStage = "all",
        order: PerStage = "depthwise_first",
        mid_act: PerStage = None,
        residual: PerStage = True,
        segment_width: PerStage = None,
        kernel_size: PerStage = 3,
        uneven: bool = False,
        act_layer: LayerSpec = "relu",
        norm_layer: LayerSpec = "batchnorm2d",
        mid_norm: LayerSpec = None,
        depth_multiplier: int = 1,
        global_pool: str = "avg",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_classes, in_chans)
        depths = (depths,) * len(widths) if isinstance(depths, int) else tuple(depths)
        if not (len(widths) == len(depths) == len(strides)) or not widths:
            raise ValueError(f"widths {tuple(widths)}, depths {tuple(depths)} and strides {tuple(strides)} need "
                             "one entry per stage (at least one stage)")
        check_sizes(width_mult, width_divisor, stem_width, {"widths": (widths, 1), "depths": (depths, 1),
                                                             "strides": (strides, 1)})
        stages = tuple(f"stage{i + 1}" for i in range(len(widths)))
        given = {"segments": segments, "order": order, "mid_act": mid_act, "residual": residual,
                 "segment_width": segment_width, "kernel_size": kernel_size}
        knobs: Mapping[str, dict[str, Any]] = {name: spread(value, stages, name) for name, value in given.items()}
        self.widths = tuple(make_divisible(w * width_mult, width_divisor) for w in widths)
        self.stem_width = make_divisible(stem_width * width_mult, width_divisor)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, self.stem_width, 3, padding=1, bias=False),
            create_norm(norm_layer, self.stem_width),
            create_act(act_layer, inplace=True),
        )
        channels = self.stem_width
        self.stages = nn.Sequential()
        for stage, width, depth, stride in zip(stages, self.widths, depths, strides):
            blocks = []
            for i in range(depth):
                with in_layer(f"stages.{stage}.{i}"):
                    blocks.append(ContinuumBlock(
                        channels, width, reps, stride if i == 0 else 1, act_layer=act_layer, norm_layer=norm_layer,
                        start_with_act=bool(len(self.stages) or i),  # the stem already ends with an activation
                        mid_norm=mid_norm, depth_multiplier=depth_multiplier, uneven=uneven,
                        **{key: per_stage[stage] for key, per_stage in knobs.items()}))
                channels = width
            self.stages.add_module(stage, nn.Sequential(*blocks))
        self.final_act = create_act(act_layer, inplace=True)
        self.head = ClassifierHead(channels, num_classes, drop_rate, act_layer=act_layer, global_pool=global_pool)
        self.trunk = ("stem", *(f"stages.{stage}" for stage in stages), "final_act")
        self.feature_info = feature_levels(self.stem_width, self.widths, strides)
        self.place(device, dtype)


def feature_levels(stem_width: int, widths: Sequence[int], strides: Sequence[int]) -> list[dict[str, Any]]:
    """timm's ``feature_info``: the stem (``N x stem_width x H x W``), then each stage's output
    (``N x widths[i] x H/(strides[0]...strides[i]) x ...``), the last after the final activation."""
    reductions = [math.prod(strides[:i + 1]) for i in range(len(widths))]
    modules = [f"stages.stage{i + 1}" for i in range(len(widths) - 1)] + ["final_act"]
    return [dict(num_chs=stem_width, reduction=1, module="stem")] + [
        dict(num_chs=width, reduction=reduction, module=module)
        for width, reduction, module in zip(widths, reductions, modules)]


default_cfgs = generate_default_cfgs({
    "continuum_small": pretrained_config((1, 28, 28), 10, "stem.0", (4, 4)),
})


@register_model
def continuum_small(pretrained: bool = False, **kwargs: Any) -> ContinuumSmall:
    """The small-input family at its defaults (3 stages, widths 64/128/256, 28 px, 1 channel, 10 classes)."""
    if pretrained:
        raise ValueError("continuum_small has no pretrained weights; train it (python -m continuum.sweep)")
    return build(ContinuumSmall, "continuum_small", pretrained, **kwargs)
