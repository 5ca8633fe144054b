"""Inception V3, the paper's baseline: timm's implementation without the auxiliary tower (as in table 1)."""

from __future__ import annotations

from typing import Any

import timm
from timm.models import register_model
from torch import nn

from continuum.models.base import model_kwargs

PAPER_PARAMS = {"continuum_xception": 22_855_952, "continuum_inception_v3": 23_626_728}
"""Parameter counts of the paper's table 3 (1000 classes, no FC layers)."""


@register_model
def continuum_inception_v3(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm's ``inception_v3`` with ``aux_logits=False``; takes timm's keyword arguments (``num_classes``,
    ``in_chans``, ``drop_rate``, ...). timm's port has 23,834,568 parameters at 1000 classes, 207,840 more than
    the paper reports (23,626,728)."""
    return timm.create_model("inception_v3", pretrained=pretrained, aux_logits=False, **model_kwargs(kwargs))
