"""A small CNN for 8x8 grey-scale digits (the embedded default model)."""

from __future__ import annotations

from torch import nn


def small_cnn(
    num_classes: int = 10, channels: tuple[int, int] = (16, 32), in_channels: int = 1
) -> nn.Sequential:
    """Conv(in->c1, 3x3) - ReLU - MaxPool(2) - Conv(c1->c2, 3x3) - ReLU - Linear(c2*16 -> classes).

    Input (batch, in_channels, 8, 8); output logits (batch, num_classes).
    """
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * 16, num_classes),
    )


__all__ = ["small_cnn"]
