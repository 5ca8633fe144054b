"""continuum's models, registered with timm on import (``timm.create_model("continuum_xception", ...)``)."""

from continuum.models.convert import ConvPlan, convert, plan_conversion
from continuum.models.inception import PAPER_PARAMS, InceptionSmall, continuum_inception_small, continuum_inception_v3
from continuum.models.small import ContinuumSmall, continuum_small
from continuum.models.xception import ContinuumXception, continuum_xception, load_legacy_xception_weights

__all__ = [
    "ContinuumSmall", "ContinuumXception", "ConvPlan", "InceptionSmall", "PAPER_PARAMS", "continuum_inception_small",
    "continuum_inception_v3", "continuum_small",
    "continuum_xception", "convert", "load_legacy_xception_weights", "plan_conversion",
]
