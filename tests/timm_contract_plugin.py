"""A pytest plugin for running timm's own ``tests/test_models.py`` on continuum's models only: every model list
timm's tests draw from (``list_models``, ``list_pretrained``) is cut to the ``continuum_*`` models."""

import timm
import timm.models

import continuum  # noqa: F401  (registers the models)


def _continuum_only(listing):
    def listed(*args, **kwargs):
        return [name for name in listing(*args, **kwargs) if name.startswith("continuum_")]
    return listed


for module in (timm, timm.models):
    module.list_models = _continuum_only(timm.models.list_models)
    module.list_pretrained = _continuum_only(timm.models.list_pretrained)
