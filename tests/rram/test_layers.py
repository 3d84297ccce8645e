"""RRAMLinear / RRAMConv2d as drop-in layers: digital equivalence, gradients, programming
life cycle, state dicts, dtypes, seeds, conversion and input validation.

References are torch's own nn.Linear / nn.Conv2d (the digital layer) and NumPy im2col.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sedma_torch as st
from sedma_torch.rram import RRAMConfig, RRAMConv2d, RRAMLinear, to_digital

IDEAL = RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)
NOISY = RRAMConfig(
    material="taox_hfox",
    tile_rows=20,
    tile_cols=4,
    stuck_at_gmin_prob=0.01,
    stuck_at_gmax_prob=0.01,
    drift_time_s=100.0,
    wire_resistance_ohm=1.0,
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)


# ----- ideal layers equal the digital ones ----------------------------------------------------
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=["1d", "2d", "3d"])
def test_ideal_linear_matches_nn_linear_for_any_leading_shape(device, lead):
    torch.manual_seed(10)
    ref = nn.Linear(37, 19, dtype=torch.float64, device=device)
    layer = RRAMLinear.from_linear(ref, IDEAL.replace(tile_rows=16, tile_cols=8))
    x = torch.randn(*lead, 37, dtype=torch.float64, generator=seeded(11)).to(device)
    with torch.no_grad():
        y = layer(x)
        expected = ref(x)
    assert y.shape == (*lead, 19)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_ideal_linear_without_bias_matches_nn_linear_in_float32():
    torch.manual_seed(12)
    ref = nn.Linear(70, 33, bias=False)
    layer = RRAMLinear.from_linear(ref, IDEAL.replace(tile_rows=32, tile_cols=16))
    x = torch.randn(8, 70, generator=seeded(13))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


CONV_CASES = [
    dict(in_channels=3, out_channels=5, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2)),
    dict(in_channels=5, out_channels=4, kernel_size=3, padding="same", dilation=2),
    dict(in_channels=4, out_channels=4, kernel_size=(4, 2), padding="same"),
    dict(in_channels=3, out_channels=2, kernel_size=3, padding="valid", bias=False),
    dict(in_channels=6, out_channels=9, kernel_size=3, padding=1, groups=3),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, groups=4),
    dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, groups=4),
    dict(in_channels=5, out_channels=7, kernel_size=3, padding=2, padding_mode="reflect"),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="circular"),
    dict(in_channels=3, out_channels=4, kernel_size=2, padding=(0, 1), padding_mode="replicate"),
]


def _case_id(case: dict) -> str:
    return "-".join(f"{k[:3]}{v}" for k, v in case.items()).replace(" ", "")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", CONV_CASES, ids=[_case_id(c) for c in CONV_CASES])
def test_ideal_conv_matches_nn_conv2d(device, case):
    torch.manual_seed(20)
    ref = nn.Conv2d(**case, dtype=torch.float64, device=device)
    # 20 rows hold two 3x3 kernels: channels spread over several, partly filled tiles
    layer = RRAMConv2d.from_conv(ref, IDEAL.replace(tile_rows=20, tile_cols=3))
    x = torch.randn(2, case["in_channels"], 9, 8, dtype=torch.float64, generator=seeded(21))
    x = x.to(device)
    with torch.no_grad():
        y, expected = layer(x), ref(x)
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_ideal_conv_accepts_unbatched_input():
    torch.manual_seed(22)
    ref = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64)
    layer = RRAMConv2d.from_conv(ref, IDEAL.replace(tile_rows=18))
    x = torch.randn(4, 7, 6, dtype=torch.float64, generator=seeded(23))
    with torch.no_grad():
        y, expected = layer(x), ref(x)
    assert y.shape == (6, 7, 6)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


# ----- conv with an ADC against a NumPy im2col tile model -------------------------------------
def np_im2col(xp: np.ndarray, kh: int, kw: int, stride, dilation) -> np.ndarray:
    """Padded (B, C, H, W) -> patches (B, Ho, Wo, C, kh, kw)."""
    b, c, h, w = xp.shape
    (sh, sw), (dh, dw) = stride, dilation
    ho = (h - dh * (kh - 1) - 1) // sh + 1
    wo = (w - dw * (kw - 1) - 1) // sw + 1
    out = np.empty((b, ho, wo, c, kh, kw))
    for i in range(kh):
        for j in range(kw):
            win = xp[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw :: sw][..., :wo]
            out[..., i, j] = win.transpose(0, 2, 3, 1)
    return out


def np_adc_auto(u: np.ndarray, tile_cols: int, bits: int) -> np.ndarray:
    levels = max(2 ** (bits - 1) - 1, 1)
    out = np.empty_like(u)
    for c0 in range(0, u.shape[-1], tile_cols):
        group = u[..., c0 : c0 + tile_cols]
        step = np.maximum(np.abs(group).max(axis=-1, keepdims=True), 1e-30) / levels
        out[..., c0 : c0 + tile_cols] = np.round(group / step) * step
    return out


@pytest.mark.parametrize(
    "groups,dtype",
    [(2, torch.float64), (1, torch.float64), (1, torch.float32)],
    ids=["grouped", "float64", "float32_compiled_epilogue"],
)
def test_conv_with_adc_matches_tiled_im2col_reference(groups, dtype):
    in_ch, out_ch, k, tile_rows, tile_cols, bits = 6, 10, 3, 20, 3, 5
    cfg = IDEAL.replace(
        adc_ranging="per_read", adc_bits=bits, tile_rows=tile_rows, tile_cols=tile_cols
    )
    torch.manual_seed(30)
    ref = nn.Conv2d(in_ch, out_ch, k, stride=2, padding=1, groups=groups, dtype=torch.float64)
    layer = RRAMConv2d.from_conv(ref, cfg).to(dtype)
    x = torch.randn(2, in_ch, 9, 10, dtype=torch.float64, generator=seeded(31))
    with torch.no_grad():
        y = layer(x.to(dtype)).double().numpy()

    w = ref.weight.detach().numpy()
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np_im2col(xp, k, k, (2, 2), (1, 1))
    c_g, out_g = in_ch // groups, out_ch // groups
    per_tile = tile_rows // (k * k)  # whole kernels per tile: 2 channels
    expected = np.zeros((2, patches.shape[1], patches.shape[2], out_ch))
    for g in range(groups):
        outs = slice(g * out_g, (g + 1) * out_g)
        for c0 in range(0, c_g, per_tile):
            local = slice(c0, min(c0 + per_tile, c_g))  # channels within the group
            chans = slice(g * c_g + local.start, g * c_g + local.stop)  # in the input
            wt = w[outs, local].reshape(out_g, -1)
            scale = np.abs(wt).max(axis=1)
            pt = patches[:, :, :, chans].reshape(*patches.shape[:3], -1)
            u = pt @ (wt / scale[:, None]).T
            expected[..., outs] += np_adc_auto(u, tile_cols, bits) * scale
    expected = expected.transpose(0, 3, 1, 2) + ref.bias.detach().numpy()[:, None, None]
    assert np.abs(expected - ref(x).detach().numpy()).max() > 1e-4  # the ADC is visible
    if dtype == torch.float64:
        np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-10)
    else:  # float32 rounding may move a value across an ADC decision boundary (one step)
        off = np.abs(y - expected) > 1e-4 * np.abs(expected).max()
        assert off.mean() < 0.02
        assert np.abs(y - expected).max() <= 2 * np.abs(expected).max() / (2 ** (bits - 1) - 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("adc_bits", [None, 16], ids=["fast_path", "stack_path_adc16"])
def test_conv_read_noise_variance_matches_patch_norm_formula(adc_bits, dtype):
    sigma = 0.02
    st.rram.register_material(
        st.rram.Material(
            name="readonly_test",
            g_max=1e-5,
            g_min=1e-6,
            levels_ltp=None,
            levels_ltd=None,
            read_noise=sigma,
        ),
        overwrite=True,
    )
    cfg = RRAMConfig(
        adc_ranging="per_read",
        material="readonly_test",
        dac_bits=None,
        adc_bits=adc_bits,
        tile_rows=18,
        tile_cols=4,
        write_verify_tolerance=1e-9,
    )
    torch.manual_seed(32)
    layer = RRAMConv2d(5, 3, 3, bias=False, config=cfg, dtype=dtype)
    image = torch.randn(1, 5, 3, 3, dtype=torch.float64, generator=seeded(33)).to(dtype)
    reps = 3000
    with torch.no_grad():  # float32 with an ADC: the compiled epilogue and its noise stream
        samples = layer(image.expand(reps, -1, -1, -1)).double().numpy()[:, :, 0, 0]
    w = layer.weight.detach().double().numpy().reshape(3, 5, 9)
    xv = image.double().numpy().reshape(5, 9)
    expected_var = np.zeros(3)
    for c0 in range(0, 5, 2):  # two whole 3x3 kernels per 18-row tile
        chans = slice(c0, min(c0 + 2, 5))
        scale = np.abs(w[:, chans]).max(axis=(1, 2))
        expected_var += 2 * sigma**2 * (xv[chans] ** 2).sum() * scale**2
    ratio = samples.var(axis=0, ddof=1) / expected_var
    assert np.all(np.abs(ratio - 1) < 5 * math.sqrt(2 / (reps - 1))), ratio
    exact = (w.reshape(3, -1) @ xv.reshape(-1)).ravel()
    assert np.all(np.abs(samples.mean(0) - exact) < 5.5 * np.sqrt(expected_var / reps))


# ----- gradients are those of the digital layer (straight-through) ----------------------------
def test_linear_gradients_equal_digital_layer_with_noisy_material():
    torch.manual_seed(40)
    ref = nn.Linear(45, 13, dtype=torch.float64)
    layer = RRAMLinear.from_linear(ref, NOISY)
    x = torch.randn(3, 4, 45, dtype=torch.float64, generator=seeded(41))
    upstream = torch.randn(3, 4, 13, dtype=torch.float64, generator=seeded(42))
    grads = []
    for module in (layer, ref):
        xi = x.clone().requires_grad_(True)
        module.zero_grad()
        (module(xi) * upstream).sum().backward()
        grads.append((xi.grad, module.weight.grad.clone(), module.bias.grad.clone()))
    with torch.no_grad():
        assert (layer(x) - ref(x)).abs().max() > 1e-3  # the forward pass is not digital
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "case",
    [
        dict(padding=1, groups=2, stride=2),
        dict(padding=2, dilation=2, padding_mode="reflect"),
        dict(padding="same"),
    ],
    ids=["grouped-strided", "dilated-reflect", "same"],
)
def test_conv_gradients_equal_digital_layer_with_noisy_material(case):
    torch.manual_seed(43)
    ref = nn.Conv2d(4, 6, 3, dtype=torch.float64, **case)
    layer = RRAMConv2d.from_conv(ref, NOISY)
    x = torch.randn(2, 4, 8, 7, dtype=torch.float64, generator=seeded(44))
    with torch.no_grad():
        out_shape = ref(x).shape
    upstream = torch.randn(out_shape, dtype=torch.float64, generator=seeded(45))
    grads = []
    for module in (layer, ref):
        xi = x.clone().requires_grad_(True)
        module.zero_grad()
        (module(xi) * upstream).sum().backward()
        grads.append((xi.grad, module.weight.grad.clone(), module.bias.grad.clone()))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ----- programming life cycle -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_optimizer_step_triggers_reprogramming_on_next_forward(kind):
    torch.manual_seed(50)
    if kind == "linear":
        ref: nn.Module = nn.Linear(12, 5, dtype=torch.float64)
        layer: nn.Module = RRAMLinear.from_linear(ref, IDEAL.replace(tile_rows=8))
        x = torch.randn(6, 12, dtype=torch.float64, generator=seeded(51))
    else:
        ref = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
        layer = RRAMConv2d.from_conv(ref, IDEAL.replace(tile_rows=18))
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=seeded(51))
    assert layer.is_programmed
    assert layer.rram_stats.programming_events == 1
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()
    opt.step()
    assert not layer.is_programmed
    y = layer(x)
    assert layer.is_programmed
    assert layer.rram_stats.programming_events == 2
    assert int(layer.program_events) == 2
    copy_weights(ref, layer)
    with torch.no_grad():
        torch.testing.assert_close(y.detach(), ref(x), rtol=1e-12, atol=1e-12)
    layer(x)
    assert layer.rram_stats.programming_events == 2  # no change, no re-programming


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_float32_read_follows_the_weights_after_an_optimizer_step(kind):
    # float32 with an ADC runs the compiled read, which packs the programmed weights once:
    # the packed copy must follow re-programming (fine ADC, so the output ~ the digital one)
    torch.manual_seed(52)
    cfg = IDEAL.replace(adc_bits=16, tile_rows=18, tile_cols=4)
    if kind == "linear":
        ref: nn.Module = nn.Linear(40, 9)
        layer: nn.Module = RRAMLinear.from_linear(ref, cfg)
        x = torch.randn(7, 40, generator=seeded(53))
    else:
        ref = nn.Conv2d(5, 6, 3, padding=1)
        layer = RRAMConv2d.from_conv(ref, cfg)
        x = torch.randn(2, 5, 6, 7, generator=seeded(53))
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(2):
        y = layer(x)
        with torch.no_grad():
            copy_weights(ref, layer)
            want = ref(x)
        torch.testing.assert_close(y.detach(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
        y.square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert layer.rram_stats.programming_events == 2


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_state_dict_roundtrip_reproduces_outputs_exactly(kind):
    torch.manual_seed(60)
    if kind == "linear":
        layer: nn.Module = RRAMLinear(45, 13, config=NOISY)
        fresh: nn.Module = RRAMLinear(45, 13, config=NOISY)
        x = torch.randn(5, 45, generator=seeded(61))
    else:
        layer = RRAMConv2d(5, 6, 3, padding=1, config=NOISY)
        fresh = RRAMConv2d(5, 6, 3, padding=1, config=NOISY)
        x = torch.randn(2, 5, 6, 6, generator=seeded(61))
    with torch.no_grad():
        layer(x)
        layer(x)  # two reads: the read-noise counter is part of the state
        fresh.load_state_dict(_roundtrip(layer.state_dict()))
        assert fresh.is_programmed
        assert int(fresh.read_calls) == int(layer.read_calls) == 2
        assert fresh.rram_seed == layer.rram_seed
        y_orig, y_loaded = layer(x), fresh(x)
    assert int(fresh.read_calls) == int(layer.read_calls) == 3
    torch.testing.assert_close(y_loaded, y_orig, rtol=0, atol=0)
    torch.testing.assert_close(fresh.w_read, layer.w_read, rtol=0, atol=0)
    assert fresh.rram_stats.programming_events == 0  # loaded, not re-programmed


def test_to_float64_after_programming_keeps_computing_the_product():
    torch.manual_seed(70)
    ref = nn.Linear(30, 9)
    layer = RRAMLinear.from_linear(ref, IDEAL.replace(tile_rows=16, tile_cols=4))
    x = torch.randn(4, 30, dtype=torch.float64, generator=seeded(71))
    layer.to(torch.float64)
    ref.to(torch.float64)
    xi = x.clone().requires_grad_(True)
    y = layer(xi)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.detach(), ref(x).detach(), rtol=1e-6, atol=1e-6)
    y.sum().backward()
    assert layer.weight.grad.dtype == torch.float64
    torch.testing.assert_close(xi.grad, ref.weight.detach().sum(0).expand(4, 30))


def test_to_float64_with_noisy_material_runs_and_stays_close_to_digital():
    torch.manual_seed(72)
    ref = nn.Linear(30, 9, dtype=torch.float64)
    layer = RRAMLinear(30, 9, config=NOISY.replace(tile_rows=16))
    copy_weights(layer, ref.float())
    ref.double()
    x = torch.randn(64, 30, generator=seeded(73))
    with torch.no_grad():
        layer(x)
        layer.to(torch.float64)
        y = layer(x.double())
        err = (y - ref(x.double())).norm() / ref(x.double()).norm()
    assert y.dtype == torch.float64
    assert layer.w_read.dtype == torch.float64
    assert 1e-4 < err < 0.5


# ----- seeds ------------------------------------------------------------------------------------
def _noisy_linear(config: RRAMConfig, seed: int | None, weight: torch.Tensor) -> RRAMLinear:
    layer = RRAMLinear(20, 7, bias=False, config=config, seed=seed)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def test_same_seeds_give_identical_outputs():
    weight = torch.randn(7, 20, generator=seeded(80))
    x = torch.randn(4, 20, generator=seeded(81))
    cfg = RRAMConfig(material="taox_hfox", seed=3, tile_rows=8)
    with torch.no_grad():
        a = [_noisy_linear(cfg, 5, weight)(x) for _ in range(2)]
        b = [_noisy_linear(cfg, 6, weight)(x) for _ in range(2)]
    torch.testing.assert_close(a[0], a[1], rtol=0, atol=0)
    torch.testing.assert_close(b[0], b[1], rtol=0, atol=0)
    assert (a[0] - b[0]).abs().max() > 1e-3  # another layer seed, another chip


def test_mvm_same_config_seed_identical_different_seed_differs():
    rng = np.random.default_rng(82)
    a = rng.standard_normal((12, 30))
    x = rng.standard_normal(30)
    cfg = RRAMConfig(material="taox_hfox", tile_rows=16)
    y0 = st.rram.mvm(a, x, cfg).y
    np.testing.assert_array_equal(st.rram.mvm(a, x, cfg).y.numpy(), y0.numpy())
    y1 = st.rram.mvm(a, x, cfg.replace(seed=1)).y
    assert (y1 - y0).abs().max() > 1e-3


def test_different_config_seed_changes_noise_of_explicitly_seeded_layer():
    # regression: an explicit layer seed used to replace config.seed instead of mixing with it
    weight = torch.randn(7, 20, generator=seeded(83))
    x = torch.randn(4, 20, generator=seeded(84))
    with torch.no_grad():
        y0 = _noisy_linear(RRAMConfig(material="taox_hfox", seed=0), 5, weight)(x)
        y1 = _noisy_linear(RRAMConfig(material="taox_hfox", seed=1), 5, weight)(x)
    assert (y1 - y0).abs().max() > 1e-3


# ----- conversion -------------------------------------------------------------------------------
def test_from_linear_from_conv_to_digital_roundtrip_keeps_weights_identical():
    torch.manual_seed(90)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, groups=1, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6),
    )
    x = torch.randn(2, 3, 5, 5, generator=seeded(91))
    with torch.no_grad():
        expected = model(x)
    conv = RRAMConv2d.from_conv(model[0], NOISY)
    linear = RRAMLinear.from_linear(model[2], NOISY.replace(tile_rows=32))
    assert torch.equal(conv.weight, model[0].weight)
    assert conv.bias is None
    assert torch.equal(linear.weight, model[2].weight)
    assert torch.equal(linear.bias, model[2].bias)
    assert (conv.stride, conv.padding, conv.padding_mode) == ((1, 1), (1, 1), "zeros")
    rram_model = nn.Sequential(conv, nn.Flatten(), linear)
    with torch.no_grad():
        assert (rram_model(x) - expected).abs().max() > 1e-4  # the crossbar is noisy
    digital = to_digital(rram_model)
    assert type(digital[0]) is nn.Conv2d
    assert type(digital[2]) is nn.Linear
    for before, after in zip(
        model.state_dict().values(), digital.state_dict().values(), strict=True
    ):
        assert torch.equal(before, after)
    with torch.no_grad():
        torch.testing.assert_close(digital(x), expected, rtol=0, atol=0)


def test_to_digital_of_a_single_layer_returns_its_digital_twin():
    torch.manual_seed(92)
    layer = RRAMConv2d(2, 3, 3, stride=2, dilation=2, padding=1, config=NOISY)
    twin = to_digital(layer)
    assert type(twin) is nn.Conv2d
    assert (twin.stride, twin.dilation, twin.padding) == ((2, 2), (2, 2), (1, 1))
    x = torch.randn(1, 2, 9, 9, generator=seeded(93))
    expected = F.conv2d(x, layer.weight, layer.bias, stride=2, padding=1, dilation=2)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), expected, rtol=0, atol=0)


# ----- input and config validation --------------------------------------------------------------
def test_linear_rejects_wrong_last_dimension_naming_expected_shape():
    layer = RRAMLinear(4, 3, config=IDEAL)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        layer(torch.randn(3, 5))


def test_conv_rejects_wrong_channel_count_naming_expected_shape():
    layer = RRAMConv2d(3, 2, 3, config=IDEAL)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        layer(torch.randn(1, 4, 6, 6))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        layer(torch.randn(6, 6))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_layers_reject_non_floating_input(dtype):
    with pytest.raises(TypeError, match="floating"):
        RRAMLinear(4, 3, config=IDEAL)(torch.ones(2, 4, dtype=dtype))
    with pytest.raises(TypeError, match="floating"):
        RRAMConv2d(1, 2, 3, config=IDEAL)(torch.ones(1, 1, 4, 4, dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises_unless_check_finite_disabled(bad):
    torch.manual_seed(100)
    ref = nn.Linear(6, 3, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64, generator=seeded(101))
    x[1, 2] = bad
    layer = RRAMLinear.from_linear(ref, IDEAL.replace(tile_rows=4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(x)
    conv = RRAMConv2d(1, 2, 3, config=IDEAL)
    with pytest.raises(ValueError, match="NaN or Inf"):
        conv(torch.full((1, 1, 4, 4), bad))
    unchecked = RRAMLinear.from_linear(ref, IDEAL.replace(tile_rows=4, check_finite=False))
    with torch.no_grad():
        y = unchecked(x)
        expected = ref(x)
    assert not torch.isfinite(y[1]).all()
    torch.testing.assert_close(y[[0, 2]], expected[[0, 2]], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("dac_bits", 0, ValueError),
        ("dac_bits", 17, ValueError),
        ("adc_bits", 0, ValueError),
        ("adc_bits", 17, ValueError),
        ("dac_bits", 8.0, TypeError),
        ("tile_rows", 0, ValueError),
        ("tile_rows", -3, ValueError),
        ("tile_cols", 0, ValueError),
        ("tile_cols", 2.5, TypeError),
        ("correction", "second_order", ValueError),
        ("denoise", "median", ValueError),
        ("dac_range", 0.0, ValueError),
        ("adc_range", -1.0, ValueError),
        ("stuck_at_gmin_prob", 1.0, ValueError),
        ("write_verify_iters", 0, ValueError),
        ("seed", 1.5, TypeError),
    ],
)
def test_config_rejects_invalid_field_naming_it(field, value, error):
    with pytest.raises(error, match=field):
        RRAMConfig(**{field: value})


def test_config_rejects_unknown_or_mistyped_material():
    with pytest.raises(ValueError, match="unknown material 'unobtainium'"):
        RRAMConfig(material="unobtainium")
    with pytest.raises(TypeError, match=r"RRAMConfig\.material"):
        RRAMConfig(material=3)  # type: ignore[arg-type]


def test_layers_reject_non_config_objects():
    with pytest.raises(TypeError, match="RRAMConfig"):
        RRAMLinear(4, 3, config={"material": "ideal"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in_features"):
        RRAMLinear(0, 3)


def test_conv_kernel_larger_than_tile_rows_is_rejected():
    with pytest.raises(ValueError, match="tile_rows"):
        RRAMConv2d(2, 3, 5, config=IDEAL.replace(tile_rows=16))
    RRAMConv2d(2, 3, 4, config=IDEAL.replace(tile_rows=16))  # 16 taps fit exactly


def test_all_zero_input_tiles_give_finite_zero_partial_sums():
    # a ReLU often zeroes a whole input tile: the converters must not divide 0 by a 0 range
    cfg = RRAMConfig(material="taox_hfox", tile_rows=16, tile_cols=8)
    torch.manual_seed(0)
    linear = RRAMLinear(48, 12, bias=False, config=cfg)
    x = torch.randn(4, 48)
    x[:, 16:32] = 0.0  # the middle input tile is all zero
    x[1] = 0.0  # and one whole vector
    y = linear(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[1], torch.zeros(12))
    conv = RRAMConv2d(3, 6, 3, padding=1, bias=False, config=cfg)
    img = torch.zeros(2, 3, 6, 6)
    img[0, :, 2:4, 2:4] = 1.0
    out = conv(img)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(6, 6, 6))


def test_deepcopy_and_pickle_keep_the_programmed_chip():
    import copy

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10)
    )
    st.convert_(model, RRAMConfig(tile_rows=64, tile_cols=32), progress=False)
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    reference = model(x)
    # same conductances and noise counters: identical outputs, no re-programming
    assert torch.equal(twin(x), reference) and torch.equal(loaded(x), reference)
    assert all(m.rram_stats.programming_events == 1 for m in twin if hasattr(m, "rram_stats"))


def test_layers_run_under_inference_mode_like_under_no_grad():
    torch.manual_seed(0)
    cfg = st.RRAMConfig(material="taox_hfox", seed=5)
    lin = nn.Linear(512, 256)
    x = torch.randn(64, 512)
    with torch.no_grad():
        expected = st.RRAMLinear.from_linear(lin, cfg, seed=1)(x)
    layer = st.RRAMLinear.from_linear(lin, cfg, seed=1)
    with torch.inference_mode():
        got = layer(x)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize(("dac_bits", "dac_range"), [(None, None), (6, None), (6, 2.5)])
def test_float32_first_order_read_equals_float64_reference_path(kind, dac_bits, dac_range):
    # float32 runs the compiled read (three reads accumulated in place), float64 the
    # PyTorch path; without noise they must agree up to float32 rounding at ADC decisions
    # (with a fixed DAC range, the exact input is scaled by that range on both paths)
    cfg = IDEAL.replace(
        adc_bits=6,
        dac_bits=dac_bits,
        dac_range=dac_range,
        correction="first_order",
        tile_rows=20,
        tile_cols=4,
    )
    torch.manual_seed(60 + (dac_bits or 0))
    if kind == "linear":
        ref = nn.Linear(50, 12, dtype=torch.float64)
        layer64 = RRAMLinear.from_linear(ref, cfg)
        x = torch.randn(9, 50, dtype=torch.float64, generator=seeded(61))
    else:
        ref = nn.Conv2d(6, 12, 3, padding=1, dtype=torch.float64)
        layer64 = RRAMConv2d.from_conv(ref, cfg)
        x = torch.randn(3, 6, 7, 8, dtype=torch.float64, generator=seeded(61))
    layer32 = copy.deepcopy(layer64).float()
    with torch.no_grad():
        want = layer64(x).numpy()
        got = layer32(x.float()).double().numpy()
    scale = np.abs(want).max()
    off = np.abs(got - want) > 1e-4 * scale
    assert off.mean() < 0.03
    assert np.abs(got - want).max() <= 3 * 2 * scale / (2**5 - 1)  # 3 reads, 2 steps at most


@pytest.mark.parametrize(
    "args",
    [
        dict(stride=(2, 1), padding=2, dilation=2),
        dict(padding="same", bias=False),
        dict(padding=1, padding_mode="reflect", stride=2),
        dict(kernel_size=(1, 3), padding=(0, 1)),
    ],
    ids=["stride_dilation", "same", "reflect", "rect_kernel"],
)
def test_float32_conv_read_equals_float64_path_for_conv_arguments(args):
    # float32 runs the compiled read (implicit im2col of the padded images), float64 the
    # PyTorch tile convolutions; with a fine ADC and no noise they agree to float32 rounding
    kwargs = {"kernel_size": 3, **args}
    cfg = IDEAL.replace(adc_bits=12, dac_bits=8, tile_rows=20, tile_cols=4)
    torch.manual_seed(70)
    ref = nn.Conv2d(5, 7, dtype=torch.float64, **kwargs)
    layer64 = RRAMConv2d.from_conv(ref, cfg)
    layer32 = copy.deepcopy(layer64).float()
    x = torch.randn(3, 5, 9, 11, dtype=torch.float64, generator=seeded(71))
    with torch.no_grad():
        want = layer64(x).numpy()
        got = layer32(x.float()).double().numpy()
    assert got.shape == want.shape == ref(x).shape
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * scale / (2**11 - 1))
