"""Model builders: small built-ins, EfficientNet-Lite0, torchvision classifiers and detector,
transformers extractive QA. None of them downloads anything."""

from .detection import fasterrcnn_mobilenet_v3
from .efficientnet_lite import EfficientNetLite0, efficientnet_lite0, lite0_weights_path
from .qa import build_qa, minilm_path
from .small_cnn import small_cnn
from .vision import hub_checkpoint_path, torchvision_classifier

__all__ = [
    "EfficientNetLite0",
    "build_qa",
    "efficientnet_lite0",
    "fasterrcnn_mobilenet_v3",
    "hub_checkpoint_path",
    "lite0_weights_path",
    "minilm_path",
    "small_cnn",
    "torchvision_classifier",
]
