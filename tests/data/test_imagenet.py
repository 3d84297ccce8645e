"""ImageNet folders: WordNet ids map to the standard class indices, subsets with missing
classes score correctly, bad layouts give clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sedma_torch.data.imagenet import (
    ImageNetFolder,
    classification_transform,
    load_synsets,
    parse_synsets,
)
from sedma_torch.data.subset import evenly_spaced_indices
from sedma_torch.experiments import evaluate_classification

from ..conftest import write_imagenet_folder

# standard ILSVRC2012 class indices (lines of LOC_synset_mapping.txt, counted from 0)
KNOWN = {"n01440764": 0, "n01443537": 1, "n03041632": 499, "n15075141": 999}
PLAIN = classification_transform(8, 8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def test_shipped_synset_list_has_the_standard_1000_ids_in_order():
    wnids = load_synsets(None)
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    for wnid, index in KNOWN.items():
        assert wnids[index] == wnid


def test_shipped_synset_list_equals_the_shared_dataset_copy(shared_data):
    path = shared_data / "imagenet-val-subset" / "LOC_synset_mapping.txt"
    assert load_synsets(None) == parse_synsets(path.read_text())


def test_folder_labels_are_standard_indices_not_folder_order(imagenet_folder):
    ds = ImageNetFolder(imagenet_folder, transform=PLAIN)
    assert ds.classes_present == ["n01443537", "n03041632", "n15075141"]
    assert [label for _, label in ds.samples] == [1, 1, 499, 499, 999, 999]
    image, label = ds[2]
    assert image.shape == (3, 8, 8) and label == 499
    # a uniform grey JPEG of level 100 reads back as ~100/255 everywhere
    assert torch.allclose(image, torch.full_like(image, 100 / 255), atol=3 / 255)


class GreyLookup(nn.Module):
    """Predicts a fixed class per image, chosen by the image's grey level."""

    def __init__(self, level_to_class: dict[int, int], classes: int = 1000) -> None:
        super().__init__()
        self.levels = torch.tensor(sorted(level_to_class), dtype=torch.float32)
        self.classes = [level_to_class[k] for k in sorted(level_to_class)]
        self.n = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.mean(dim=(1, 2, 3)) * 255
        nearest = (grey[:, None] - self.levels[None]).abs().argmin(1)
        logits = torch.zeros(x.shape[0], self.n)
        for i, k in enumerate(nearest.tolist()):
            logits[i, self.classes[k]] = 10.0
            logits[i, (self.classes[k] + 1) % self.n] = 5.0  # runner-up: the next index
        return logits


def test_subset_with_missing_classes_scores_against_standard_indices(imagenet_folder):
    # hand-built: 6 images of classes 1, 1, 499, 499, 999, 999. Predictions: 1, 1 (right),
    # 499 (right), 2 (wrong; its runner-up 3 is wrong too), 999 (right), 998 (wrong, but
    # its runner-up 999 is right) -> top1 4/6, top2 5/6. Numbering the folders 0, 1, 2 (as
    # torchvision's ImageFolder does) would give top1 0/6.
    model = GreyLookup({20: 1, 60: 1, 100: 499, 140: 2, 180: 999, 220: 998})
    ds = ImageNetFolder(imagenet_folder, transform=PLAIN)
    result = evaluate_classification(model, ds, batch_size=4, progress=False, ks=(1, 2))
    assert result.n_samples == 6
    assert result.metrics == pytest.approx({"top1": 4 / 6, "top2": 5 / 6})


def test_synset_file_in_the_root_takes_precedence(tmp_path):
    root = write_imagenet_folder(tmp_path / "d", {"n00000002": [50], "n00000001": [90]})
    (root / "LOC_synset_mapping.txt").write_text("n00000009 nine\nn00000002 two\nn00000001 one\n")
    ds = ImageNetFolder(root, transform=PLAIN)
    assert ds.samples[0][0].parent.name == "n00000001" and ds.samples[0][1] == 2
    assert ds.samples[1][0].parent.name == "n00000002" and ds.samples[1][1] == 1


def test_images_directly_under_root_without_split_folder(tmp_path):
    root = write_imagenet_folder(tmp_path / "flat", {"n01440764": [30]}, split=None)
    ds = ImageNetFolder(root, transform=PLAIN)
    assert [label for _, label in ds.samples] == [0]


def test_missing_root_error_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageNetFolder(missing)


def test_folder_that_is_not_a_wordnet_id_is_rejected(tmp_path):
    root = write_imagenet_folder(tmp_path / "d", {"n01440764": [30]})
    (root / "val" / "cats").mkdir()
    with pytest.raises(ValueError, match="cats"):
        ImageNetFolder(root, transform=PLAIN)


def test_empty_folder_tree_is_rejected(tmp_path):
    (tmp_path / "d" / "val" / "n01440764").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageNetFolder(tmp_path / "d")


def test_bad_synset_line_names_the_line():
    with pytest.raises(ValueError, match="line 2"):
        parse_synsets("n01440764 tench\ntench n01443537\n")


def test_evenly_spaced_indices_hand_computed():
    assert evenly_spaced_indices(10, 4) == [0, 2, 5, 7]
    assert evenly_spaced_indices(5, None) == [0, 1, 2, 3, 4]
    assert evenly_spaced_indices(3, 7) == [0, 1, 2]
    with pytest.raises(ValueError, match="limit"):
        evenly_spaced_indices(10, 0)


def test_shared_subset_loads_with_725_classes(shared_data):
    ds = ImageNetFolder(Path(shared_data) / "imagenet-val-subset")
    assert len(ds) == 1300 and len(ds.classes_present) == 725
    wnids = load_synsets(None)
    assert all(wnids[label] == path.parent.name for path, label in ds.samples)
