"""Dataset builders: the embedded digits default, ImageNet folders, COCO, SQuAD."""

from .coco import CocoDetection, build_coco, collate
from .digits import load_digits_split
from .imagenet import ImageNetFolder, classification_transform, load_synsets, parse_synsets
from .squad import SquadExample, load_squad, references
from .subset import evenly_spaced_indices, limit_dataset

__all__ = [
    "CocoDetection",
    "ImageNetFolder",
    "SquadExample",
    "build_coco",
    "classification_transform",
    "collate",
    "evenly_spaced_indices",
    "limit_dataset",
    "load_digits_split",
    "load_squad",
    "load_synsets",
    "parse_synsets",
    "references",
]
