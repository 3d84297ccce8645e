"""convert_ reports what it converted and what it left digital (and why); converts shared
modules everywhere, re-configures converted models, and covers nn.Conv1d,
nn.MultiheadAttention and parametrized layers (exact at ``ideal`` against the digital
model)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrizations

import sedma_torch as st

IDEAL = st.RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)
NOISY = st.RRAMConfig(material="epiram", seed=0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def zoo() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "emb": nn.Embedding(5, 4),
            "c1": nn.Conv1d(2, 3, 3),
            "c3": nn.Conv3d(1, 1, 1),
            "ct": nn.ConvTranspose2d(1, 1, 2),
            "rnn": nn.LSTM(4, 4),
            "gru": nn.GRU(4, 4),
            "mha": nn.MultiheadAttention(8, 2),
            "bil": nn.Bilinear(2, 2, 2),
            "norm": nn.LayerNorm(4),
            "lazy": nn.LazyLinear(3),
            "wn": parametrizations.weight_norm(nn.Linear(4, 4)),
            "lin": nn.Linear(4, 4),
        }
    )


def test_report_lists_every_converted_and_every_weight_bearing_digital_module(caplog):
    model = zoo()
    with caplog.at_level(logging.INFO, logger="sedma_torch.rram.convert"):
        st.convert_(model, IDEAL, progress=False)
    report = st.conversion_report(model)
    converted = {fqn: new for fqn, _, new in report.converted}
    assert converted == {
        "c1": "RRAMConv1d",
        "mha": "RRAMMultiheadAttention",
        "wn": "ParametrizedRRAMLinear",
        "lin": "RRAMLinear",
    }
    digital = {fqn: reason for fqn, _, reason in report.digital}
    assert set(digital) == {"emb", "c3", "ct", "rnn", "gru", "bil", "norm", "lazy"}
    assert "forward pass" in digital["lazy"]
    assert "digital by design" in digital["emb"] and "digital by design" in digital["norm"]
    for fqn in ("c3", "ct", "rnn", "gru", "bil"):
        assert "no crossbar mapping" in digital[fqn]
    # logged (INFO: the whole report; WARNING: the modules a user may expect converted)
    assert "left digital" in caplog.text
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and "LSTM" in warned[0].getMessage() and "Embedding" not in warned[0].getMessage()
    text = str(st.summary(model))
    assert "left digital" in text and "rnn" in text and "RRAMConv1d" in text


def test_filtered_and_hook_based_weight_norm_modules_are_reported_with_their_reason():
    old_style = torch.nn.utils.weight_norm(nn.Linear(4, 4))  # deprecated hook-based
    model = nn.Sequential(nn.Linear(4, 4), old_style)
    st.convert_(model, IDEAL, filter_fn=lambda m, fqn: fqn != "0", progress=False)
    digital = {fqn: reason for fqn, _, reason in st.conversion_report(model).digital}
    assert digital["0"] == "excluded by filter_fn"
    assert "parametrizations.weight_norm" in digital["1"]
    assert type(model[1]) is nn.Linear


def test_a_module_used_twice_is_converted_at_both_places():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    digital = copy.deepcopy(model)
    st.convert_(model, IDEAL, progress=False)
    assert isinstance(model[0], st.RRAMLinear) and model[0] is model[2]
    assert model[0].weight is shared.weight
    x = torch.randn(3, 6, generator=gen(1))
    with torch.no_grad():
        assert rel(model(x), digital(x)) < 1e-6
    assert int(model[0].read_calls) == 0  # ideal: no noise draws; programmed once
    assert len(st.conversion_report(model).converted) == 1


def test_converting_again_with_another_config_reconfigures_and_the_same_config_does_nothing():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(16, 8), nn.ReLU(), nn.Conv1d(1, 2, 3), nn.MultiheadAttention(4, 2)
    )
    st.convert_(model, IDEAL, progress=False)
    layer = model[0]
    x = torch.randn(4, 16, generator=gen(3))
    with torch.no_grad():
        y_ideal = layer(x)
    st.convert_(model, IDEAL, progress=False)
    assert st.conversion_report(model).reconfigured == []
    st.convert_(model, NOISY, progress=False)
    report = st.conversion_report(model)
    assert {fqn for fqn, _, _ in report.reconfigured} == {"0", "2", "3"}
    assert report.converted == []
    assert layer.rram_config == NOISY and model[2].rram_config == NOISY
    assert model[3].rram_config == NOISY and model[3].in_proj.rram_config == NOISY
    with torch.no_grad():
        y_noisy = layer(x)
    err = rel(y_noisy, y_ideal)
    assert 1e-4 < err < 0.5  # a chip of the new material was read
    assert layer.rram_stats.last_programming is not None
    st.convert_(model, IDEAL, progress=False)
    with torch.no_grad():
        assert rel(layer(x), y_ideal) < 1e-6


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"stride": 2, "padding": 1, "dilation": 2},
        {"padding": "same"},
        {"padding": 2, "padding_mode": "circular"},
        {"groups": 4, "bias": False},
        {"groups": 8},  # depthwise (timm's ECA uses a 1-channel Conv1d)
    ],
)
def test_conv1d_is_exact_at_ideal_with_digital_gradients(kwargs):
    torch.manual_seed(4)
    digital = nn.Conv1d(8, 8, 3, **kwargs).double()
    layer = st.RRAMConv1d.from_conv1d(digital, IDEAL)
    x = torch.randn(2, 8, 17, dtype=torch.float64, generator=gen(5), requires_grad=True)
    y, want = layer(x), digital(x)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer(x[0]), digital(x[0]), rtol=1e-10, atol=1e-10)
    g = torch.randn(y.shape, dtype=torch.float64, generator=gen(6))
    got = torch.autograd.grad(y, (x, layer.weight), g)
    ref = torch.autograd.grad(want, (x, digital.weight), g)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert layer.weight.shape == digital.weight.shape
    twin = st.to_digital(layer)
    assert type(twin) is nn.Conv1d and twin.weight is layer.weight


def test_eca_style_channel_attention_converts_and_stays_close_with_a_noisy_material():
    class ECA(nn.Module):  # timm's efficient channel attention
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

        def forward(self, x):
            y = x.mean((2, 3)).unsqueeze(1)
            return x * self.conv(y).sigmoid().transpose(1, 2).unsqueeze(-1)

    torch.manual_seed(7)
    digital = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), ECA())
    model = copy.deepcopy(digital)
    st.convert_(model, NOISY, progress=False)
    assert isinstance(model[1].conv, st.RRAMConv1d)
    x = torch.randn(2, 3, 8, 8, generator=gen(8))
    with torch.no_grad():
        y = model(x)
    assert torch.isfinite(y).all() and rel(y, digital(x)) < 0.5


def test_small_vision_transformer_is_exact_at_ideal_with_every_attention_converted():
    torch.manual_seed(9)
    digital = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    ).eval()
    model = copy.deepcopy(digital)
    st.convert_(model, IDEAL, progress=False)
    attns = [m for m in model.modules() if isinstance(m, st.RRAMMultiheadAttention)]
    assert len(attns) == 2
    x = torch.randn(2, 3, 32, 32, generator=gen(10))
    with torch.no_grad():
        torch.testing.assert_close(model(x), digital(x), rtol=1e-4, atol=1e-5)
    st.to_digital(model)
    assert not any(
        isinstance(m, st.RRAMMultiheadAttention | st.RRAMLinear) for m in model.modules()
    )


def test_vit_b_16_has_its_twelve_attention_blocks_converted():
    with torch.device("meta"):  # the real architecture, no memory for its weights
        model = torchvision.models.vit_b_16()
        st.convert_(model, IDEAL, program=False, progress=False)
    kinds = [new for _, _, new in st.conversion_report(model).converted]
    assert kinds.count("RRAMMultiheadAttention") == 12
    assert kinds.count("RRAMLinear") == 12 * 2 + 1  # MLP blocks and the head
    assert kinds.count("RRAMConv2d") == 1  # the patch embedding


def test_weight_norm_parametrized_linear_converts_and_trains_its_original_tensors():
    torch.manual_seed(11)
    digital = nn.Sequential(parametrizations.weight_norm(nn.Linear(6, 5)))
    model = copy.deepcopy(digital)
    st.convert_(model, IDEAL, progress=False)
    layer = model[0]
    assert isinstance(layer, st.RRAMLinear)
    originals = {name for name, _ in layer.named_parameters()}
    assert {"parametrizations.weight.original0", "parametrizations.weight.original1"} <= originals
    x = torch.randn(4, 6, generator=gen(12))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    opt_d = torch.optim.AdamW(digital.parameters(), lr=0.05, fused=True)
    for _ in range(3):
        for m, o in ((model, opt), (digital, opt_d)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    with torch.no_grad():
        assert rel(model(x), digital(x)) < 1e-5
    twin = st.to_digital(copy.deepcopy(model))
    assert type(twin[0]).__name__ == "ParametrizedLinear"
    with torch.no_grad():
        assert rel(twin(x), digital(x)) < 1e-5


def test_converting_an_rram_layer_itself_points_to_reconfigure():
    with pytest.raises(ValueError, match="reconfigure_"):
        st.convert_(st.RRAMLinear(3, 3, config=IDEAL), NOISY)
