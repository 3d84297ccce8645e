"""Shared pytest fixtures and markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SEDMA_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _private_memory_store(tmp_path_factory, monkeypatch):
    """Each test (and the train.py / eval.py processes it starts) gets its own long-term
    memory file instead of ./sedma_memory.db in the working directory."""
    if "SEDMA_MEMORY_URL" not in os.environ:
        path = tmp_path_factory.mktemp("memory") / "sedma_memory.db"
        monkeypatch.setenv("SEDMA_MEMORY_PATH", str(path))


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (or $SEDMA_SHARED_DATA); skips when absent."""
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set SEDMA_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> torch.device:
    return torch.device(request.param)


def write_imagenet_folder(
    root: Path, images: dict[str, list[int]], *, size: int = 12, split: str | None = "val"
) -> Path:
    """An ImageNet-layout folder ``root/split/<wnid>/<wnid>_<k>.JPEG`` (real JPEG files) of
    uniform grey images, one per grey level listed for each WordNet id; returns ``root``."""
    from PIL import Image

    base = root / split if split else root
    for wnid, levels in images.items():
        folder = base / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for k, level in enumerate(levels):
            Image.new("RGB", (size, size), (level, level, level)).save(
                folder / f"{wnid}_{k}.JPEG", quality=95
            )
    return root


@pytest.fixture
def imagenet_folder(tmp_path) -> Path:
    """Six grey JPEGs in three WordNet-id folders (standard class indices 1, 499 and 999);
    grey levels 20, 60, ... identify the images."""
    return write_imagenet_folder(
        tmp_path / "imagenet",
        {"n01443537": [20, 60], "n03041632": [100, 140], "n15075141": [180, 220]},
    )
