"""What every continuum classifier shares: the classification head and timm's model interface."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from continuum.block import LayerSpec, create_act


def model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a timm entry point meant for the model: drops timm's pretrained-config keys."""
    return {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}


class ClassifierHead(nn.Module):
    """Global average pool -> optional hidden FC layers -> dropout -> linear classifier.

    Args:
        in_features: channels of the feature map.
        num_classes: classes; 0 leaves the pooled (pre-logit) features.
        drop_rate: dropout probability before the classifier; it is applied in training, unlike
            timm's ``legacy_xception`` whose dropout result is discarded.
        hidden_dims: widths of fully connected layers before the classifier (the paper's optional FC layers).
        act_layer: activation after each hidden layer.
    """

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0,
                 hidden_dims: tuple[int, ...] = (), act_layer: LayerSpec = "relu") -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate={drop_rate} is not valid; use 0 <= drop_rate < 1")
        layers: list[nn.Module] = []
        for dim in hidden_dims:
            layers += [nn.Linear(in_features, dim), create_act(act_layer, inplace=True)]
            in_features = dim
        self.hidden = nn.Sequential(*layers)
        self.num_features = in_features
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.hidden(x.mean((2, 3)))  # N x C x H x W -> N x F
        x = self.drop(x)
        return x if pre_logits else self.fc(x)  # N x num_classes


class ContinuumClassifier(nn.Module):
    """Base of the continuum models: ``forward_features`` + :class:`ClassifierHead`, with timm's interface
    (``num_classes``, ``num_features``, ``get_classifier``, ``reset_classifier``, ``pretrained_cfg``).

    Subclasses build ``self.head`` and implement ``forward_features``.
    """

    head: ClassifierHead

    def __init__(self, num_classes: int, in_chans: int, input_size: tuple[int, int, int]) -> None:
        super().__init__()
        if num_classes < 0 or in_chans < 1:
            raise ValueError(f"num_classes={num_classes}, in_chans={in_chans} are not valid; "
                             "use num_classes >= 0 and in_chans >= 1")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.pretrained_cfg: dict[str, Any] = {
            "num_classes": num_classes, "input_size": input_size, "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.5,) * in_chans, "std": (0.5,) * in_chans,
            "first_conv": "", "classifier": "head.fc",
        }
        self.default_cfg = self.pretrained_cfg

    @property
    def num_features(self) -> int:
        """Width of the pre-logit features."""
        return self.head.num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and (x.ndim != 4 or x.shape[1] != self.in_chans):  # not a torch.fx Proxy
            raise ValueError(f"{type(self).__name__} expects N x {self.in_chans} x H x W input, got shape "
                             f"{tuple(x.shape)}")
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` classes (0 removes it)."""
        self.num_classes = num_classes
        self.head.fc = nn.Linear(self.head.num_features, num_classes) if num_classes > 0 else nn.Identity()
