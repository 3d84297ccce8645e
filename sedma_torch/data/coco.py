"""COCO 2017 detection data in the official layout (``instances_*.json`` + image folder)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset


def _missing_message(what: str, path: Path, root: Path) -> str:
    return (
        f"COCO {what} not found at {str(path)!r}. Provide COCO 2017 in the official layout: "
        f"{root}/annotations/instances_val2017.json and the images in {root}/val2017/ (from "
        "https://cocodataset.org/#download: val2017.zip and annotations_trainval2017.zip), or "
        "the 80-image subset shared/data/coco-val2017-subset, and point dataset.root at it "
        "(or set dataset.ann_file / dataset.image_dir). Nothing is downloaded."
    )


class CocoDetection(Dataset):
    """COCO images with their box annotations, in torchvision detection format.

    Item ``i`` is ``(image, target)``: ``image`` a float tensor ``(3, H, W)`` in [0, 1]
    (RGB; grey images are expanded), ``target`` a dict with ``boxes`` ``(N, 4)`` float
    [x1, y1, x2, y2] in pixels, ``labels`` ``(N,)`` int64 COCO category ids (1..90, the
    numbering torchvision's COCO detectors predict), ``image_id`` int, ``area`` ``(N,)``
    and ``iscrowd`` ``(N,)``. ``coco`` is the ``pycocotools.coco.COCO`` ground truth.
    """

    def __init__(self, ann_file: str | Path, image_dir: str | Path, *, limit: int | None = None):
        from pycocotools.coco import COCO

        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                self.coco = COCO(str(self.ann_file))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{self.ann_file} is not a COCO instances file ({exc!r}); expected JSON "
                    "with 'images', 'annotations' and 'categories'"
                ) from exc
        for key in ("images", "annotations", "categories"):
            if key not in self.coco.dataset:
                raise ValueError(f"{self.ann_file} is not a COCO instances file: no {key!r} list")
        self.ids: list[int] = sorted(self.coco.getImgIds())
        if limit is not None:
            self.ids = self.ids[:limit]
        missing = [
            self.coco.imgs[i]["file_name"]
            for i in self.ids
            if not (self.image_dir / self.coco.imgs[i]["file_name"]).is_file()
        ]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.ids)} COCO images listed in {self.ann_file} are "
                f"missing from {self.image_dir} (first: {missing[0]!r}); provide the image "
                "folder that belongs to the annotation file (dataset.image_dir)."
            )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        from torchvision.io import ImageReadMode, decode_image, read_file

        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            raise ValueError(f"cannot decode COCO image {path}: {exc}") from exc
        anns = self.coco.imgToAnns.get(image_id, [])
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        target = {
            "boxes": boxes,
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "image_id": image_id,
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
        }
        return image.float().div_(255.0), target


def build_coco(
    root: str | Path,
    *,
    ann_file: str | Path | None = None,
    image_dir: str | Path | None = None,
    limit: int | None = None,
    split: str = "val2017",
) -> CocoDetection:
    """The COCO ``split`` under ``root`` (``annotations/instances_<split>.json``, ``<split>/``).

    ``ann_file`` / ``image_dir`` override the two paths (relative ones are taken under
    ``root``); ``limit`` keeps the first ``limit`` images by id. Missing files raise a
    ``FileNotFoundError`` that says what to provide.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"build_coco: limit must be an int >= 1 or None, got {limit!r}")
    root = Path(root)
    ann = root / (ann_file if ann_file is not None else f"annotations/instances_{split}.json")
    images = root / (image_dir if image_dir is not None else split)
    if not ann.is_file():
        raise FileNotFoundError(_missing_message("annotation file", ann, root))
    if not images.is_dir():
        raise FileNotFoundError(_missing_message("image folder", images, root))
    return CocoDetection(ann, images, limit=limit)


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keep images and targets as lists (images differ in size; detectors take lists)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


__all__ = ["CocoDetection", "build_coco", "collate"]
