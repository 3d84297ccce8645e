"""The drop-in contract: a converted layer never silently reads a crossbar programmed from
other weights than its own, and works wherever the digital layer works.

Each test is the regression test of one way a layer used to go stale or break (issue 12);
the reference is always the digital layer with the same weights (``to_digital`` of a deep
copy, or ``nn.Linear`` / ``nn.Conv2d`` / ``F.conv2d`` directly) on fresh seeded inputs.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import sedma_torch as st
from sedma_torch.rram import RRAMConfig, RRAMConv2d, RRAMLinear

IDEAL = RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)
NOISY = RRAMConfig(material="epiram", seed=0)
NOISY_SMALL_TILES = RRAMConfig(material="taox_hfox", tile_rows=18, tile_cols=4, seed=1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def digital_copy(model: nn.Module) -> nn.Module:
    return st.to_digital(copy.deepcopy(model))


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def make(kind: str, config: RRAMConfig, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "linear":
        return RRAMLinear(8, 4, config=config), torch.randn(6, 8, generator=gen(seed + 1))
    return (
        RRAMConv2d(3, 5, 3, padding=1, config=config),
        torch.randn(2, 3, 6, 6, generator=gen(seed + 1)),
    )


# ----- 1. load_state_dict ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_loading_a_checkpoint_saved_after_an_optimizer_step_reprograms(kind):
    # the saved conductances belong to the weights before the step: the loaded layer must
    # not read them as if they were the saved weights'
    layer, x = make(kind, IDEAL, seed=10)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().sum().backward()
    opt.step()
    fresh, _ = make(kind, IDEAL, seed=11)
    fresh.load_state_dict(roundtrip(layer.state_dict()))
    assert not fresh.is_programmed
    with torch.no_grad():
        assert rel(fresh(x), digital_copy(fresh)(x)) < 1e-6
    assert fresh.is_programmed


@pytest.mark.parametrize("strict", [True, False])
def test_loading_a_digital_checkpoint_into_a_converted_model_reprograms(strict):
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn(p.shape, generator=gen(13)))
    st.convert_(model, IDEAL, progress=False)
    assert model[0].is_programmed
    if strict:  # a digital checkpoint lacks the crossbar state: strict loading says so
        with pytest.raises(RuntimeError, match="g_pos"):
            model.load_state_dict(trained.state_dict(), strict=True)
        return
    model.load_state_dict(trained.state_dict(), strict=False)
    assert not model[0].is_programmed
    x = torch.randn(5, 8, generator=gen(14))
    with torch.no_grad():
        assert rel(model(x), trained(x)) < 1e-6


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_checkpoint_whose_conductances_belong_to_its_weights_restores_the_chip_bit_exactly(kind):
    layer, x = make(kind, NOISY_SMALL_TILES, seed=15)
    with torch.no_grad():
        layer(x)
    events = int(layer.program_events)
    fresh, _ = make(kind, NOISY_SMALL_TILES, seed=16)
    fresh.load_state_dict(roundtrip(layer.state_dict()))
    assert fresh.is_programmed
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    assert int(fresh.program_events) == events  # restored, not re-programmed


def test_a_checkpoint_from_before_fingerprints_reprograms_from_its_conductances():
    layer, x = make("linear", NOISY_SMALL_TILES, seed=17)
    state = layer.state_dict()
    del state["programmed_fp"]
    fresh, _ = make("linear", NOISY_SMALL_TILES, seed=18)
    fresh.load_state_dict(state)  # strict: the missing key is filled in, not an error
    assert not fresh.is_programmed
    torch.testing.assert_close(fresh.g_pos, layer.g_pos)
    with torch.no_grad():
        assert rel(fresh(x), digital_copy(fresh)(x)) < 0.3
    assert int(fresh.program_events) == int(layer.program_events) + 1


# ----- 3. in-place edits that bypass the version counter ---------------------------------------
EDITS = {
    "data_mul": lambda w: w.data.mul_(0),
    "data_copy": lambda w: w.data.copy_(torch.randn(w.shape, generator=gen(20))),
    "no_grad_add": lambda w: w.add_(1.0),
    "data_assign": lambda w: setattr(w, "data", torch.randn(w.shape, generator=gen(21))),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_in_place_weight_edits_reprogram_before_the_next_read(kind, edit):
    layer, x = make(kind, IDEAL, seed=22)
    with torch.no_grad():
        layer(x)
        EDITS[edit](layer.weight)
        y = layer(x)
        assert rel(y, digital_copy(layer)(x)) < 1e-6


# ----- 4. inference mode -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_programming_inside_inference_mode_leaves_a_layer_that_trains_and_loads(kind):
    layer, x = make(kind, NOISY_SMALL_TILES, seed=23)
    with torch.no_grad():
        layer.weight.mul_(0.5)  # must re-program at the next read
    with torch.inference_mode():
        y_inf = layer(x)
    assert torch.isfinite(y_inf).all()
    assert not layer.g_pos.is_inference() and not layer.w_read.is_inference()
    y = layer(x)  # training forward and backward afterwards
    y.square().sum().backward()
    assert torch.isfinite(layer.weight.grad).all()
    other, _ = make(kind, NOISY_SMALL_TILES, seed=24)
    other.load_state_dict(layer.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(other(x), layer(x), rtol=0.5, atol=0.5)


# ----- 5. empty batches ------------------------------------------------------------------------
@pytest.mark.parametrize("config", [IDEAL, NOISY], ids=["ideal", "noisy"])
def test_empty_batches_return_empty_outputs_of_the_digital_shape(config):
    lin = RRAMLinear(8, 4, config=config)
    conv = RRAMConv2d(3, 5, 3, stride=2, padding=1, config=config)
    calls = int(lin.read_calls), int(conv.read_calls)
    for layer, x in (
        (lin, torch.randn(0, 8)),
        (lin, torch.randn(2, 0, 8)),
        (conv, torch.randn(0, 3, 9, 7)),
    ):
        x.requires_grad_(True)
        want = st.to_digital(copy.deepcopy(layer))(x)
        got = layer(x)
        assert got.shape == want.shape and got.dtype == want.dtype
        got.sum().backward()
        assert x.grad.shape == x.shape
    assert (int(lin.read_calls), int(conv.read_calls)) == calls  # nothing was read


# ----- 6. half-precision modules ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_half_precision_layers_simulate_in_float32_and_return_finite_outputs(kind, dtype):
    torch.manual_seed(30)
    if kind == "linear":
        layer = RRAMLinear(64, 16, config=NOISY)
        x = torch.randn(32, 64, generator=gen(31))
    else:
        layer = RRAMConv2d(8, 16, 3, padding=1, config=NOISY)
        x = torch.randn(4, 8, 8, 8, generator=gen(31))
    layer = layer.to(dtype)
    xh = x.to(dtype)
    y = layer(xh)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    assert layer.w_read.dtype == torch.float32 and layer.g_pos.dtype == torch.float32
    # the digital layer of the same (rounded) weights, in float32
    want = digital_copy(layer).float()(xh.float())
    assert rel(y.float(), want) < 0.25  # epiram's device error, not overflow
    ideal = copy.deepcopy(layer)
    ideal.reconfigure_(IDEAL)
    assert rel(ideal(xh).float(), want) < 1e-2  # only the output rounding to dtype


def test_moving_a_programmed_layer_to_half_keeps_the_chip_and_reprograms_the_rounded_weight():
    layer, x = make("conv", NOISY_SMALL_TILES, seed=32)
    with torch.no_grad():
        layer(x)
    g = layer.g_pos.clone()
    events = int(layer.program_events)
    layer.half()
    # the chip did not change (conductances stay float32, bit for bit) ...
    assert layer.g_pos.dtype == torch.float32
    torch.testing.assert_close(layer.g_pos, g, rtol=0, atol=0)
    # ... but the weight was rounded: the next read programs the rounded weight
    assert not layer.is_programmed
    with torch.no_grad():
        assert torch.isfinite(layer(x.half())).all()
    assert int(layer.program_events) == events + 1


# ----- 7. autocast ----------------------------------------------------------------------------
@pytest.mark.parametrize("config", [IDEAL, NOISY], ids=["ideal", "noisy"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_autocast_output_dtype_follows_the_digital_layer_and_backward_works(kind, config):
    layer, x = make(kind, config, seed=33)
    digital = digital_copy(layer)
    x = x.clone().requires_grad_(True)
    xd = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        yd = digital(xd)
    assert y.dtype == yd.dtype == torch.bfloat16
    if config is IDEAL:  # the simulation is float32; the digital layer rounds its inputs
        assert rel(y.float(), yd.float()) < 3e-2
    y.float().square().sum().backward()
    yd.float().square().sum().backward()
    assert x.grad.dtype == x.dtype and layer.weight.grad.dtype == layer.weight.dtype
    assert torch.isfinite(layer.weight.grad).all()
    if config is IDEAL:
        assert rel(layer.weight.grad, digital.weight.grad) < 5e-2


# ----- 9. convolution arguments are validated before any compiled read -----------------------------
@pytest.mark.parametrize(
    "kwargs, what",
    [
        ({"dilation": (-10000000, 1)}, "dilation"),
        ({"dilation": 0}, "dilation"),
        ({"stride": (1, -1)}, "stride"),
        ({"stride": 0}, "stride"),
    ],
)
def test_conv_rejects_non_positive_stride_or_dilation(kwargs, what):
    with pytest.raises(ValueError, match=what):
        RRAMConv2d(1, 1, (3, 1), config=NOISY, **kwargs)


@pytest.mark.parametrize(
    "attr, value, what",
    [
        ("dilation", (-2, -2), "dilation"),
        ("stride", (0, 1), "stride"),
        ("padding", (-1, 0), "padding"),
    ],
)
def test_conv_attributes_changed_after_construction_are_checked_at_the_read(attr, value, what):
    conv = RRAMConv2d(1, 1, 3, config=NOISY)
    setattr(conv, attr, value)
    with pytest.raises(ValueError, match=what):
        conv(torch.randn(1, 1, 9, 9))


def test_conv_input_smaller_than_the_kernel_is_rejected_naming_the_sizes():
    conv = RRAMConv2d(1, 1, 3, dilation=4, config=NOISY)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        conv(torch.randn(1, 1, 8, 8))


# ----- device / dtype moves, to_empty ------------------------------------------------------------
def test_to_empty_then_initialising_the_weights_reprograms_from_scratch():
    layer, x = make("linear", IDEAL, seed=40)
    with torch.no_grad():
        layer(x)
    layer.to_empty(device="cpu")
    assert not layer.is_programmed and layer.g_pos.numel() == 0
    layer.reset_parameters()
    with torch.no_grad():
        assert rel(layer(x), digital_copy(layer)(x)) < 1e-6
    assert int(layer.read_calls) >= 0 and int(layer.program_events) == 2


def test_to_float64_keeps_the_programmed_chip_without_reprogramming():
    layer, x = make("linear", NOISY_SMALL_TILES, seed=41)
    with torch.no_grad():
        y32 = layer(x)
    events = int(layer.program_events)
    layer.double()
    assert layer.is_programmed
    with torch.no_grad():
        y64 = layer(x.double())
    assert int(layer.program_events) == events
    assert rel(y64, y32) < 0.3  # same chip, new read noise


# ----- parametrizations ------------------------------------------------------------------------
class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).t()


def test_parametrized_weight_is_read_as_computed_and_follows_its_original():
    torch.manual_seed(42)
    layer = RRAMLinear(6, 6, config=IDEAL)
    parametrize.register_parametrization(layer, "weight", Symmetric())
    x = torch.randn(4, 6, generator=gen(43))
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)
    for _ in range(2):
        y = layer(x)
        want = F.linear(x, layer.weight, layer.bias)
        assert rel(y.detach(), want.detach()) < 1e-6
        y.square().sum().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert rel(layer(x), F.linear(x, layer.weight, layer.bias)) < 1e-6


# ----- copies ------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_are_independent_layers_that_read_the_same_chip(how):
    layer, x = make("conv", NOISY_SMALL_TILES, seed=44)
    with torch.no_grad():
        layer(x)
    twin = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    assert twin._handle != layer._handle
    events = int(twin.program_events)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)
        twin.weight.mul_(2)  # changing the copy re-programs the copy only
        twin(x)
    assert int(twin.program_events) == events + 1
    assert int(layer.program_events) == events


# ----- torch.compile ------------------------------------------------------------------------------
def test_compiled_mlp_has_no_graph_break_and_matches_eager():
    torch.manual_seed(45)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    st.convert_(model, IDEAL, progress=False)
    x = torch.randn(4, 16, generator=gen(46))
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # the compiled graph re-programs too
    with torch.no_grad():
        assert rel(compiled(x), digital_copy(model)(x)) < 1e-6
