"""continuum: architecture search and ablation over the Inception–separable continuum (Xception, CVPR 2017).

Importing it registers the models with timm::

    import continuum, timm
    model = timm.create_model("continuum_xception", segments=8, order="pointwise_first")
"""

from continuum.allocator import keep_freed_memory
from continuum.block import ContinuumBlock, ContinuumConv, SegmentedConv2d
from continuum.config import ModelConfig
from continuum.knobs import SegmentError
from continuum.norm import BatchNorm2d
from continuum.strategy import conv_strategy
from continuum.models import convert, plan_conversion

__version__ = "0.1.0"

__all__ = [
    "BatchNorm2d", "ContinuumBlock", "ContinuumConv", "ModelConfig", "SegmentError", "SegmentedConv2d",
    "conv_strategy", "convert", "keep_freed_memory", "plan_conversion", "__version__",
]
