"""COCO data in the official layout, generated at test time (JSON + PNG images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from sedma_torch.data.coco import build_coco, collate


def make_coco_fixture(
    root: Path, *, n_images: int = 3, seed: int = 0, crowd: bool = True
) -> tuple[dict, dict[int, torch.Tensor]]:
    """Write ``root/annotations/instances_val2017.json`` and ``root/val2017/*.png``.

    Images are small random RGB (and one grey) pictures of different sizes with 1-4 boxes
    each, category ids from the sparse COCO numbering; returns the JSON dict and the uint8
    pixels written per image id.
    """
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    cats = [{"id": c, "name": f"cat{c}", "supercategory": "x"} for c in (1, 3, 18, 90)]
    images, anns, pixels = [], [], {}
    for i in range(n_images):
        image_id = 1000 + 7 * i
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        channels = 1 if i == 1 else 3
        img = torch.from_numpy(rng.integers(0, 256, (channels, h, w), dtype=np.uint8))
        name = f"{image_id:012d}.png"
        write_png(img, str(root / "val2017" / name))
        pixels[image_id] = img.expand(3, h, w) if channels == 1 else img
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for k in range(int(rng.integers(1, 5))):
            bw, bh = float(rng.uniform(5, w / 2)), float(rng.uniform(5, h / 2))
            x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice([c["id"] for c in cats])),
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh * 0.8,
                    "iscrowd": int(crowd and i == 0 and k == 0),
                    "segmentation": [[x, y, x + bw, y, x + bw, y + bh]],
                }
            )
    data = {"images": images, "annotations": anns, "categories": cats}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return data, pixels


def test_items_hold_the_written_pixels_and_xyxy_boxes_with_coco_ids(tmp_path):
    data, pixels = make_coco_fixture(tmp_path)
    ds = build_coco(str(tmp_path))
    assert len(ds) == 3 and ds.ids == sorted(pixels)
    for image, target in ds:
        image_id = target["image_id"]
        assert image.dtype == torch.float32 and image.shape[0] == 3
        torch.testing.assert_close(image, pixels[image_id].float() / 255)
        anns = [a for a in data["annotations"] if a["image_id"] == image_id]
        expected = torch.tensor(
            [
                [
                    a["bbox"][0],
                    a["bbox"][1],
                    a["bbox"][0] + a["bbox"][2],
                    a["bbox"][1] + a["bbox"][3],
                ]
                for a in anns
            ]
        )
        torch.testing.assert_close(target["boxes"], expected)
        assert target["labels"].tolist() == [a["category_id"] for a in anns]
        assert target["iscrowd"].tolist() == [a["iscrowd"] for a in anns]
        torch.testing.assert_close(target["area"], torch.tensor([a["area"] for a in anns]))


def test_limit_keeps_the_first_images_by_id_and_collate_keeps_lists(tmp_path):
    _, pixels = make_coco_fixture(tmp_path, n_images=4)
    ds = build_coco(tmp_path, limit=2)
    assert ds.ids == sorted(pixels)[:2] and len(ds) == 2
    images, targets = collate([ds[0], ds[1]])
    assert isinstance(images, list) and len(images) == 2
    assert [t["image_id"] for t in targets] == ds.ids


def test_custom_annotation_file_and_image_folder(tmp_path):
    make_coco_fixture(tmp_path / "a")
    ds = build_coco(
        tmp_path,
        ann_file=tmp_path / "a" / "annotations" / "instances_val2017.json",
        image_dir="a/val2017",
    )
    assert len(ds) == 3


def test_missing_files_name_the_path_and_what_to_provide(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"instances_val2017\.json.*official layout"):
        build_coco(tmp_path / "nowhere")
    make_coco_fixture(tmp_path)
    first = sorted((tmp_path / "val2017").iterdir())[0]
    first.unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 of 3 COCO images.*{first.name}"):
        build_coco(tmp_path)
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="not a COCO instances file"):
        build_coco(tmp_path)
    with pytest.raises(ValueError, match="limit must be"):
        build_coco(tmp_path, limit=0)


def test_real_subset_has_80_images_in_the_official_layout(shared_data):
    ds = build_coco(shared_data / "coco-val2017-subset", limit=2)
    image, target = ds[0]
    info = ds.coco.imgs[target["image_id"]]
    assert image.shape == (3, info["height"], info["width"])
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert len(ds.coco.getImgIds()) == 80
