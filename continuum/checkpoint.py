"""A trained model's weights and what rebuilds it, in one file: ``save_checkpoint`` writes it atomically (a killed
run leaves the previous file or none, never half of one), ``load_checkpoint`` rebuilds the exact model.

The file is a ``torch.save`` dict readable with ``weights_only=True``: ``model`` (the timm name), ``kwargs`` (what
``timm.create_model`` was given, classes and input channels included), ``state_dict`` and ``info`` (free-form
plain values: the point, the seed, the trial).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

import continuum.models  # noqa: F401  (registers the models with timm)
from continuum.files import atomic_write


def save_checkpoint(path: Path, model: nn.Module, name: str, kwargs: dict[str, Any], info: dict[str, Any]) -> Path:
    """Write ``model``'s weights with what rebuilds it to ``path``, atomically.

    Args:
        path: the file (its folder is made).
        model: the trained model.
        name: its registered timm name.
        kwargs: the keyword arguments it was built with.
        info: plain values kept beside it (text, numbers, lists, dicts).
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"model": name, "kwargs": kwargs, "state_dict": state, "info": info}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The model saved in ``path`` (in eval mode, on ``device``) and its ``info``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a continuum checkpoint.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict) or not {"model", "kwargs", "state_dict"} <= set(payload):
        raise ValueError(f"{path} is not a continuum checkpoint (no model, kwargs and state_dict)")
    model = timm.create_model(payload["model"], **payload["kwargs"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), payload.get("info", {})
