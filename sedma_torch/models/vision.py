"""torchvision ImageNet classifiers with weights read from a local file or the torch hub cache.

Nothing is ever downloaded: when no file is given, the weights must already be in the
torch hub cache (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``)
under the file name torchvision would download them to.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

TORCHVISION_CLASSIFIERS = ("resnet18", "resnet50")


def hub_checkpoint_path(arch: str, weights_tag: str = "IMAGENET1K_V1") -> tuple[Path, str]:
    """(path in the torch hub cache, download URL) of torchvision's ``arch`` weights."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    try:
        entry = enum[weights_tag]
    except KeyError:
        raise ValueError(
            f"{arch}: unknown weights_tag {weights_tag!r}; known: {', '.join(w.name for w in enum)}"
        ) from None
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name, entry.url


def torchvision_classifier(
    arch: str,
    weights: str | Path | None = None,
    *,
    weights_tag: str = "IMAGENET1K_V1",
    pretrained: bool = True,
    num_classes: int = 1000,
) -> nn.Module:
    """A torchvision classifier (``resnet18`` or ``resnet50``) in eval mode.

    Args:
        arch: torchvision model name.
        weights: a state_dict file; ``None`` reads torchvision's ``weights_tag`` file from the
            torch hub cache (never downloads; a missing file raises FileNotFoundError saying
            where to put it).
        pretrained: ``False`` returns a randomly initialised model (tests).
        num_classes: classifier outputs (1000 for the pretrained weights).
    """
    import torchvision

    if arch not in TORCHVISION_CLASSIFIERS:
        raise ValueError(f"arch must be one of {TORCHVISION_CLASSIFIERS}, got {arch!r}")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if pretrained:
        if weights is None:
            path, url = hub_checkpoint_path(arch, weights_tag)
            if not path.is_file():
                raise FileNotFoundError(
                    f"{arch} weights not found: no model.weights file was given and the torch "
                    f"hub cache has no {path}. This program never downloads. Either copy the "
                    f"file {url} (torchvision's {arch} {weights_tag} weights) to {path} (set "
                    f"TORCH_HOME to use another cache folder), or pass "
                    f"model.weights=/path/to/{path.name} (any state_dict of torchvision's "
                    f"{arch})."
                )
        else:
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(
                    f"{arch} weights file {str(path)!r} does not exist; pass model.weights="
                    "/path/to/file.pth (a torchvision state_dict), or model.weights=null to "
                    "read the torch hub cache"
                )
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()


__all__ = ["TORCHVISION_CLASSIFIERS", "hub_checkpoint_path", "torchvision_classifier"]
