"""torchvision classifiers never download: a missing hub file gives a clear error."""

from __future__ import annotations

import pytest
import torch
import torchvision

from sedma_torch.models.small_cnn import small_cnn
from sedma_torch.models.vision import hub_checkpoint_path, torchvision_classifier


def test_missing_hub_cache_file_error_names_the_cache_path_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert hub_checkpoint_path("resnet18")[0] == expected
    with pytest.raises(FileNotFoundError) as err:
        torchvision_classifier("resnet18")
    message = str(err.value)
    assert str(expected) in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "never downloads" in message


def test_local_weights_file_loads_strictly(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(num_classes=7)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    model = torchvision_classifier("resnet18", path, num_classes=7)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.eval()(x))


def test_missing_local_file_and_unknown_arch_or_tag(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        torchvision_classifier("resnet50", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="arch"):
        torchvision_classifier("vgg11")
    with pytest.raises(ValueError, match="weights_tag"):
        hub_checkpoint_path("resnet50", "IMAGENET9K")


def test_small_cnn_maps_digits_to_ten_logits():
    assert small_cnn()(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
