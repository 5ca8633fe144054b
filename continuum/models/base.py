"""What every continuum classifier shares: the classification head and timm's model interface.

A model is a *trunk* (a chain of modules, named in :attr:`ContinuumClassifier.trunk`, that makes the feature map)
and a :class:`ClassifierHead`. From the chain and ``feature_info`` come ``forward_features``,
``forward_intermediates`` and ``prune_intermediate_layers``, so timm's ``features_only=True`` (its feature getter),
``reset_classifier``, ``num_features`` and ``head_hidden_size`` work as on timm's own models.
"""

import math
import numbers
from typing import Any, Mapping, Sequence

import torch
from timm.models import build_model_with_cfg, get_pretrained_cfg
from timm.models._features import feature_take_indices
from torch import nn

from continuum.block import LayerSpec, create_act
from continuum.knobs import parse_whole

POOLS = ("avg", "")
"""Global pooling of the head: average, or none (``""``: the head passes the feature map through)."""


class ClassifierHead(nn.Module):
    """Global average pool -> optional hidden FC layers -> dropout -> linear classifier.

    Args:
        in_features: channels of the feature map.
        num_classes: classes; 0 leaves the pooled (pre-logit) features.
        drop_rate: dropout probability before the classifier; it is applied in training, unlike
            timm's ``legacy_xception`` whose dropout result is discarded.
        hidden_dims: widths of fully connected layers before the classifier (the paper's optional FC layers).
        act_layer: activation after each hidden layer.
        global_pool: ``"avg"``, or ``""`` for no pooling (then no hidden layers and no classifier).
    """

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0,
                 hidden_dims: tuple[int, ...] = (), act_layer: LayerSpec = "relu", global_pool: str = "avg") -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate={drop_rate} is not valid; use 0 <= drop_rate < 1")
        self.in_features = in_features
        self.global_pool = check_pool(global_pool, num_classes, hidden_dims)
        layers: list[nn.Module] = []
        for dim in hidden_dims:
            layers += [nn.Linear(in_features, dim), create_act(act_layer, inplace=True)]
            in_features = dim
        self.hidden = nn.Sequential(*layers)
        self.num_features = in_features
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool != "":
            x = x.mean((2, 3))  # N x C x H x W -> N x C
        x = self.drop(self.hidden(x))  # N x F
        return x if pre_logits else self.fc(x)  # N x num_classes

    def reset(self, num_classes: int, global_pool: str | None = None, like: torch.Tensor | None = None) -> None:
        """A fresh classifier for ``num_classes`` (0: none); ``global_pool`` changes the pooling (``None`` keeps
        it); ``like`` gives the classifier's device and dtype (default: torch's); it trains or evaluates as the
        head does."""
        if global_pool is not None:
            self.global_pool = check_pool(global_pool, num_classes, tuple(self.hidden))
        factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
        self.fc = nn.Linear(self.num_features, num_classes, **factory) if num_classes > 0 else nn.Identity()
        self.fc.train(self.training)


def check_pool(global_pool: str, num_classes: int, hidden: tuple) -> str:
    """``global_pool`` if valid: ``"avg"``, or ``""`` with neither classifier nor hidden layers."""
    if global_pool not in POOLS:
        raise ValueError(f"global_pool={global_pool!r} is not valid; use 'avg' or '' (no pooling)")
    if not global_pool and (num_classes > 0 or hidden):
        raise ValueError("global_pool='' (no pooling) needs num_classes=0 and no hidden layers")
    return global_pool


def check_sizes(width_mult: float, width_divisor: int, stem_width: int,
                per_stage: Mapping[str, tuple[Sequence[int], int]]) -> None:
    """Refuse sizes that build no net: ``width_mult`` a positive number, ``width_divisor`` and ``stem_width`` whole
    numbers >= 1, and every entry of each per-stage list a whole number >= that list's minimum.

    Args:
        width_mult: the scale of every width.
        width_divisor: what widths are rounded to a multiple of.
        stem_width: the stem's channels.
        per_stage: ``{name: (values, minimum)}``, e.g. ``{"widths": (widths, 1), "depths": (depths, 0)}``.

    Raises:
        ValueError: naming the first value refused and what is accepted.
    """
    if isinstance(width_mult, bool) or not isinstance(width_mult, numbers.Real) or not 0 < width_mult < math.inf:
        raise ValueError(f"width_mult={width_mult!r} is not valid; use a positive number")
    parse_whole("width_divisor", width_divisor)
    parse_whole("stem_width", stem_width)
    for name, (values, minimum) in per_stage.items():
        for stage, value in enumerate(values):
            parse_whole(f"{name}[{stage}]", value, minimum)


class ContinuumClassifier(nn.Module):
    """Base of the continuum models: a trunk and a :class:`ClassifierHead`, with timm's interface (``num_classes``,
    ``num_features``, ``head_hidden_size``, ``feature_info``, ``get_classifier``, ``reset_classifier``,
    ``forward_features``, ``forward_head``, ``forward_intermediates``, ``prune_intermediate_layers``).

    Subclasses build their trunk's modules in order, then ``self.head``, ``self.trunk`` (the module paths that make
    the feature map, in order: every child but the head, or paths inside them) and ``self.feature_info`` (one
    ``dict(num_chs, reduction, module)`` per feature level, ``module`` a trunk path), then call :meth:`place`.
    ``forward`` compiles with ``torch.jit.script`` (the segmented convs then run torch's grouped conv, untuned).
    """

    def __init__(self, num_classes: int, in_chans: int) -> None:
        super().__init__()
        if num_classes < 0 or in_chans < 1:
            raise ValueError(f"num_classes={num_classes}, in_chans={in_chans} are not valid; "
                             "use num_classes >= 0 and in_chans >= 1")
        self.num_classes = num_classes
        self.in_chans = in_chans

    def place(self, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        """Check that the trunk runs through the child modules in the order they were made (``forward_features``
        walks the children), then move the built model to ``device`` / ``dtype`` when given (timm's factory
        arguments)."""
        roots = list(dict.fromkeys(path.split(".")[0] for path in self.trunk))
        children = [name for name in self._modules if name != "head"]
        if roots != children:
            raise TypeError(f"{type(self).__name__}.trunk runs through {roots}; it must run through every child "
                            f"module but the head, in the order they were made: {children}")
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @property
    def num_features(self) -> int:
        """Channels of the feature map (``forward_features``)."""
        return self.head.in_features

    @property
    def head_hidden_size(self) -> int:
        """Width of the pre-logit features (after the head's hidden layers)."""
        return self.head.num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map: every child module but the head, in order (see each model's shape notes)."""
        for name, module in self.named_children():
            if name != "head":
                x = module(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self.check_input(x)
        return self.forward_head(self.forward_features(x))

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse an input that is not ``N x in_chans x H x W`` floating-point images (a torch.fx Proxy passes)."""
        if not isinstance(x, torch.Tensor):
            return
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"{type(self).__name__} expects N x {self.in_chans} x H x W input, got shape "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{type(self).__name__} expects floating-point images, got {x.dtype}; convert them "
                             "first (e.g. x.float() / 255)")

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` classes (0 removes it); ``global_pool``
        ``""`` removes the pooling too (``None`` keeps it). The classifier is made on the model's device, in its
        dtype."""
        self.head.reset(num_classes, global_pool, next(self.parameters(), None))
        self.num_classes = num_classes

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The feature map and the feature levels of ``feature_info`` on the way (timm's interface).

        Args:
            x: ``N x C x H x W`` images.
            indices: the levels to return: the last ``n`` for an int, all for ``None``, else these (negative from
                the end).
            norm: no final norm here; accepted for timm's interface.
            stop_early: stop after the last level asked for (the feature map is then not computed).
            output_fmt: ``"NCHW"`` only.
            intermediates_only: return the levels alone.

        Returns:
            The levels, or ``(feature map, levels)``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; use 'NCHW'")
        take, last = feature_take_indices(len(self.feature_info), indices)
        taps = {self.trunk.index(self.feature_info[i]["module"]): i for i in take}
        end = max(taps) + 1 if stop_early or intermediates_only else len(self.trunk)
        levels = []
        for position, path in enumerate(self.trunk[:end]):
            x = self.get_submodule(path)(x)
            if position in taps:
                levels.append(x)
        return levels if intermediates_only else (x, levels)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the trunk after the last level in ``indices`` (and the head with ``prune_head``); returns the
        levels' absolute indices."""
        take, last = feature_take_indices(len(self.feature_info), indices)
        end = self.trunk.index(self.feature_info[last]["module"]) + 1
        for path in self.trunk[end:]:
            self.set_submodule(path, nn.Identity())
        if prune_head:
            self.reset_classifier(0, "")
        return take


def pretrained_config(input_size: tuple[int, int, int], num_classes: int, first_conv: str, pool_size: tuple[int, int],
                      **extra: Any) -> dict[str, Any]:
    """A model's ``pretrained_cfg`` entry (timm's keys): the input it expects and where its first and last layers
    are."""
    channels = input_size[0]
    return {"input_size": input_size, "num_classes": num_classes, "pool_size": pool_size, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.5,) * channels, "std": (0.5,) * channels,
            "first_conv": first_conv, "classifier": "head.fc", **extra}


def build(model_class: type, variant: str, pretrained: bool, input_size: tuple[int, int] | None = None,
          **kwargs: Any) -> nn.Module:
    """A continuum model through timm's builder: its ``pretrained_cfg`` (by ``variant``), weights when
    ``pretrained``, and ``features_only=True`` through the model's ``forward_intermediates`` (all levels unless
    ``out_indices`` says otherwise).

    Args:
        model_class: the model's class.
        variant: the registered name (with a pretrained tag, if any).
        pretrained: load the variant's weights.
        input_size: the nominal ``(H, W)``, recorded in ``pretrained_cfg`` (with ``in_chans``, and the mean and
            std per channel); default: the variant's. With ``pretrained``, the config stays the weights' own (timm
            adapts the first conv to ``in_chans``).
        kwargs: timm's (``pretrained_cfg_overlay``, ``features_only``, ...) and the model's.
    """
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if not pretrained and (input_size is not None or kwargs.get("in_chans") is not None):
        default = get_pretrained_cfg(variant.split(".")[0]).input_size
        channels = kwargs.get("in_chans") or default[0]
        overlay = {"input_size": (channels, *(input_size or default[1:])), "mean": (0.5,) * channels,
                   "std": (0.5,) * channels} | overlay
    return build_model_with_cfg(model_class, variant, pretrained, pretrained_cfg_overlay=overlay,
                                feature_cfg={"feature_cls": "getter", "out_indices": None}, **kwargs)
