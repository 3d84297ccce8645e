"""ImageNet (ILSVRC2012) classification in the ImageFolder layout, labelled by WordNet id.

Images live in ``<root>/<split>/<wnid>/*.JPEG`` (or ``<root>/<wnid>/*.JPEG``). Folder names
are mapped to class indices through the standard 1,000-synset list
``LOC_synset_mapping.txt`` (one ``<wnid> <names>`` line per class, in class-index order):
taken from the dataset root when present, else the copy shipped in this package. So a
subset with missing classes still gets the indices the pretrained models predict, unlike
torchvision's ``ImageFolder``, which numbers the folders it finds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

SYNSET_FILE = "LOC_synset_mapping.txt"
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_synsets(text: str, *, source: str = "synset list") -> list[str]:
    """WordNet ids, in class-index order, from the text of a ``LOC_synset_mapping.txt``."""
    wnids = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        wnid = line.split()[0]
        if not (wnid.startswith("n") and wnid[1:].isdigit()):
            raise ValueError(
                f"{source}, line {lineno}: expected '<wnid> <names>' with a WordNet id like "
                f"n01440764, got {line[:60]!r}"
            )
        wnids.append(wnid)
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{source}: duplicate WordNet ids")
    return wnids


def load_synsets(root: str | Path | None = None) -> list[str]:
    """The 1,000 WordNet ids in class-index order: ``<root>/LOC_synset_mapping.txt`` when it
    exists, else the list shipped with sedma_torch."""
    if root is not None:
        path = Path(root) / SYNSET_FILE
        if path.is_file():
            return parse_synsets(path.read_text(), source=str(path))
    text = resources.files("sedma_torch.data").joinpath("imagenet_synsets.txt").read_text()
    return parse_synsets(text, source="sedma_torch/data/imagenet_synsets.txt")


def classification_transform(
    image_size: int = 224,
    resize_size: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bilinear",
) -> Callable[[Image.Image], torch.Tensor]:
    """Evaluation preprocessing: resize the shorter side to ``resize_size``, centre-crop
    ``image_size``, to a float (3, H, W) tensor in [0, 1], normalise by ``mean``/``std``."""
    from torchvision.transforms import v2 as T

    modes = {
        "bilinear": T.InterpolationMode.BILINEAR,
        "bicubic": T.InterpolationMode.BICUBIC,
        "nearest": T.InterpolationMode.NEAREST,
    }
    if interpolation not in modes:
        raise ValueError(f"interpolation must be one of {sorted(modes)}, got {interpolation!r}")
    if image_size > resize_size:
        raise ValueError(
            f"image_size ({image_size}) must be <= resize_size ({resize_size}): the crop is "
            "taken from the resized image"
        )
    return T.Compose(
        [
            T.PILToTensor(),
            T.Resize(resize_size, interpolation=modes[interpolation], antialias=True),
            T.CenterCrop(image_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(mean), std=list(std)),
        ]
    )


class ImageNetFolder(Dataset):
    """ImageNet-style folder of ``<wnid>/<image>`` files with standard class indices.

    Args:
        root: the dataset root; images in ``root/split/<wnid>/`` or, when that folder does
            not exist, ``root/<wnid>/``.
        split: sub-folder of ``root`` (``"val"``; ``None`` for images directly under root).
        transform: PIL image -> tensor (default :func:`classification_transform`).
        synsets: WordNet ids in class-index order (default :func:`load_synsets` of root).

    Items are ``(image tensor, class index)``; ``samples`` lists ``(path, index)`` in
    sorted order (by wnid, then file name), ``classes_present`` the wnids found.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = "val",
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        synsets: Sequence[str] | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(
                f"ImageNet root {str(root)!r} does not exist or is not a folder; set "
                "dataset.root to a folder holding val/<wnid>/*.JPEG (ILSVRC2012 validation "
                "images sorted into one folder per WordNet id)"
            )
        image_dir = root / split if split and (root / split).is_dir() else root
        self.synsets = list(synsets) if synsets is not None else load_synsets(root)
        index = {wnid: i for i, wnid in enumerate(self.synsets)}
        folders = sorted(p for p in image_dir.iterdir() if p.is_dir())
        unknown = [p.name for p in folders if p.name not in index]
        if unknown:
            raise ValueError(
                f"{image_dir}: folder(s) {unknown[:5]} are not WordNet ids of the synset list "
                f"({len(self.synsets)} classes); the layout is <root>/{split or ''}/<wnid>/"
            )
        self.samples: list[tuple[Path, int]] = [
            (path, index[folder.name])
            for folder in folders
            for path in sorted(folder.iterdir())
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise FileNotFoundError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {image_dir}/<wnid>/"
            )
        self.classes_present = [f.name for f in folders]
        self.image_dir = image_dir
        self.transform = transform if transform is not None else classification_transform()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYNSET_FILE",
    "ImageNetFolder",
    "classification_transform",
    "load_synsets",
    "parse_synsets",
]
