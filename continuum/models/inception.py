"""The paper's baseline: Inception V3 (timm's, without the auxiliary tower, as in table 1), and an Inception-V3-style
net for small images built from the same modules at any width."""

from __future__ import annotations

from typing import Any, Sequence

import timm
import torch
from timm.layers import make_divisible
from timm.models import generate_default_cfgs, register_model
from torch import nn

from continuum.models.base import ClassifierHead, ContinuumClassifier, build, check_sizes, pretrained_config
from continuum.norm import BatchNorm2d

PAPER_PARAMS = {"continuum_xception": 22_855_952, "continuum_inception_v3": 23_626_728}
"""Parameter counts of the paper's table 3 (1000 classes, no FC layers)."""


default_cfgs = generate_default_cfgs({
    "continuum_inception_v3": timm.models.get_pretrained_cfg("inception_v3").to_dict(),
    "continuum_inception_small": pretrained_config((1, 28, 28), 10, "stem.0", (4, 4)),
})


@register_model
def continuum_inception_v3(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm's ``inception_v3`` with ``aux_logits=False``; takes timm's keyword arguments (``num_classes``,
    ``in_chans``, ``drop_rate``, ...). timm's port has 23,834,568 parameters at 1000 classes, 207,840 more than
    the paper reports (23,626,728)."""
    return timm.create_model("inception_v3", pretrained=pretrained, aux_logits=False, **kwargs)


def conv_bn_act(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1) -> nn.Sequential:
    """Inception V3's basic unit: conv (``same`` padding) -> batch norm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class InceptionModule(nn.Module):
    """Inception V3's module A at any width: towers 1x1 | 1x1-3x3 | 1x1-3x3-3x3 | avgpool-1x1, concatenated.

    The towers take 1/4, 1/4, 3/8 and 1/8 of ``width`` (V3's 64 | 64 | 96 | 32-64 proportions); ``out_channels``
    is their sum, which may differ from ``width`` by rounding.

    Args:
        in_channels: input channels.
        width: nominal output channels.
    """

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        part = [max(1, round(width * f)) for f in (1 / 4, 3 / 16, 1 / 4, 1 / 4, 3 / 8, 1 / 8)]
        self.tower1 = conv_bn_act(in_channels, part[0])
        self.tower3 = nn.Sequential(conv_bn_act(in_channels, part[1]), conv_bn_act(part[1], part[2], 3))
        self.tower5 = nn.Sequential(conv_bn_act(in_channels, part[3]), conv_bn_act(part[3], part[4], 3),
                                    conv_bn_act(part[4], part[4], 3))  # a 5x5 factorised into two 3x3
        self.tower_pool = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                                        conv_bn_act(in_channels, part[5]))
        self.out_channels = part[0] + part[2] + part[4] + part[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        towers = (self.tower1(x), self.tower3(x), self.tower5(x), self.tower_pool(x))
        return torch.cat(towers, 1)  # N x out_channels x H x W


class InceptionReduction(nn.Module):
    """Inception V3's grid reduction (module B) at any width: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2, concatenated.

    Args:
        in_channels: input channels (the max-pool tower passes them through).
        width: nominal output channels; the two conv towers share ``width - in_channels``.
    """

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        grown = max(2, round((width - in_channels) / 2))
        self.tower3 = conv_bn_act(in_channels, grown, 3, stride=2)
        self.tower5 = nn.Sequential(conv_bn_act(in_channels, max(1, grown // 2)),
                                    conv_bn_act(max(1, grown // 2), grown, 3), conv_bn_act(grown, grown, 3, 2))
        self.tower_pool = nn.MaxPool2d(3, 2, 1)
        self.out_channels = in_channels + 2 * grown

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.tower3(x), self.tower5(x), self.tower_pool(x)), 1)  # N x out x H/2 x W/2


class InceptionSmall(ContinuumClassifier):
    """An Inception-V3-style net for 28–32 px images, the baseline :func:`continuum_small` is compared with.

    stem conv -> per stage: grid reduction (stride 2) + ``depth`` Inception modules -> head. Like Inception V3 it
    has no residual connections and only regular (one-segment) convolutions, split into towers.

    Args:
        num_classes: classes (0: none).
        in_chans: image channels.
        drop_rate: dropout before the classifier.
        stem_width: channels of the stem conv.
        widths: nominal output channels of each stage.
        depths: Inception modules per stage after its reduction.
        width_mult: scales ``stem_width`` and ``widths`` (rounded to ``width_divisor``).
        width_divisor: widths are made multiples of it.
        global_pool: ``"avg"``, or ``""`` to return the feature map (with ``num_classes=0``).
        device: where to put the parameters (timm's factory argument).
        dtype: their dtype.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0, stem_width: int = 32,
                 widths: Sequence[int] = (64, 128, 256), depths: Sequence[int] = (1, 1, 1), width_mult: float = 1.0,
                 width_divisor: int = 8, global_pool: str = "avg", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(num_classes, in_chans)
        if len(widths) != len(depths) or not widths:
            raise ValueError(f"widths {tuple(widths)} and depths {tuple(depths)} need one entry per stage (at least "
                             "one stage)")
        check_sizes(width_mult, width_divisor, stem_width, {"widths": (widths, 1), "depths": (depths, 0)})
        channels = make_divisible(stem_width * width_mult, width_divisor)
        self.stem = conv_bn_act(in_chans, channels, 3)  # N x stem x H x W
        self.stages = nn.Sequential()  # stage i: N x C_i x H/2^i x W/2^i
        self.feature_info = [dict(num_chs=channels, reduction=1, module="stem")]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            width = make_divisible(width * width_mult, width_divisor)
            layers: list[nn.Module] = [InceptionReduction(channels, width)]
            for _ in range(depth):
                layers.append(InceptionModule(layers[-1].out_channels, width))
            channels = layers[-1].out_channels
            self.stages.add_module(f"stage{i + 1}", nn.Sequential(*layers))
            self.feature_info.append(dict(num_chs=channels, reduction=2 ** (i + 1), module=f"stages.stage{i + 1}"))
        self.head = ClassifierHead(channels, num_classes, drop_rate, global_pool=global_pool)
        self.trunk = ("stem", *(f"stages.{name}" for name in self.stages._modules))
        self.place(device, dtype)


@register_model
def continuum_inception_small(pretrained: bool = False, **kwargs: Any) -> InceptionSmall:
    """The Inception-V3-style baseline for small images (3 stages, nominal widths 64/128/256, 28 px, 1 channel)."""
    if pretrained:
        raise ValueError("continuum_inception_small has no pretrained weights; train it (python -m continuum.sweep)")
    return build(InceptionSmall, "continuum_inception_small", pretrained, **kwargs)
