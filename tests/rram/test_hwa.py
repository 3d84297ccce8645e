"""Noise-injection hardware-aware training (sedma_torch.rram.hwa)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import sedma_torch as st
from sedma_torch.experiments.training import hwa_mode_of
from sedma_torch.rram.crossbar import program_tiles
from sedma_torch.rram.hwa import ProgrammingErrorModel, clip_weights_, hwa_noise, hwa_noise_

MATERIALS = ["epiram", "ag_asi", "alox_hfo2", "taox_hfox"]
BANDS = [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]


def _var_of_var(e: torch.Tensor) -> float:
    c = e - e.mean()
    return float((c**4).mean() - c.var() ** 2)


def _events(model: nn.Module) -> int:
    return sum(m.rram_stats.programming_events for m in model.modules() if hasattr(m, "rram_stats"))


@pytest.mark.parametrize("iters", [1, 20])
@pytest.mark.parametrize("material", MATERIALS)
def test_injected_error_has_the_statistics_of_program_tiles(material, iters):
    """Per level band, the sampled programming error of the HWA forward has the mean and
    variance of the real write-and-verify model on the same weights (within 5
    standard errors of the two sample sizes), and a two-sample KS statistic below the
    alpha = 0.001 critical value."""
    cfg = st.RRAMConfig(material=material, write_verify_iters=iters, seed=7)
    w = torch.randn(2, 256, 256, generator=torch.Generator().manual_seed(3))
    prog = program_tiles(w, cfg, seed=7, event=0)  # the reference: real programming
    m = cfg.device
    u = w / prog.col_scale.unsqueeze(1)
    t = torch.stack([u.clamp(min=0), (-u).clamp(min=0)])
    real = (torch.stack([prog.g_pos, prog.g_neg]) - m.g_min) / m.g_range - t
    sampled = ProgrammingErrorModel.fit(cfg).sample(t, torch.Generator().manual_seed(11)) - t
    assert torch.equal(real[t == 0], sampled[t == 0])  # erased idle cells: no error either way
    for lo, hi in BANDS:
        band = (t > lo) & (t <= hi)
        a, b = real[band].double(), sampled[band].double()
        n_a, n_b = a.numel(), b.numel()
        se_mean = math.sqrt(a.var() / n_a + b.var() / n_b)
        assert abs(a.mean() - b.mean()) < 5 * se_mean + 1e-6, (lo, hi)
        # standard error of a sample variance, (mu4 - var^2) / n: the errors of a
        # write-verify loop are heavy-tailed (a few cells that did not converge)
        se_var = math.sqrt(_var_of_var(a) / n_a + _var_of_var(b) / n_b)
        assert abs(a.var() - b.var()) < 5 * se_var + 1e-8, (lo, hi)
    pulsed = t > 0
    n = 20_000
    d = stats.ks_2samp(real[pulsed][:n].numpy(), sampled[pulsed][:n].numpy()).statistic
    assert d < 1.95 * math.sqrt(2 / n)


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10)
    )


def test_hwa_noise_training_never_programs_the_crossbar():
    torch.manual_seed(0)
    model = st.convert_(_cnn(), st.RRAMConfig(write_verify_iters=1), program=False, progress=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    with hwa_noise(model):
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        assert _events(model) == 0
        assert [m.hwa_samples for m in model if hasattr(m, "hwa_samples")] == [3, 3]
    model.eval()
    with torch.no_grad():
        model(x)
        model(x)
    assert _events(model) == 2  # programmed once per layer after training, then only read
    assert all(m.is_programmed for m in model if hasattr(m, "is_programmed"))


def test_each_noisy_read_draws_a_new_chip():
    torch.manual_seed(0)
    layer = st.RRAMLinear(32, 8, config=st.RRAMConfig(material="taox_hfox", write_verify_iters=1))
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    with hwa_noise(layer), torch.no_grad():
        assert not torch.equal(layer(x), layer(x))


def test_noise_free_hwa_forward_equals_the_digital_layer():
    """Ideal device, no converters: the HWA read is the digital layer's product."""
    torch.manual_seed(0)
    digital = nn.Linear(40, 12)
    cfg = st.RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)
    layer = st.RRAMLinear.from_linear(copy.deepcopy(digital), cfg, program=False)
    x = torch.randn(9, 40, generator=torch.Generator().manual_seed(4))
    with hwa_noise(layer), torch.no_grad():
        torch.testing.assert_close(layer(x), digital(x), rtol=1e-5, atol=1e-5)


def test_hwa_gradients_are_straight_through_to_the_digital_weights():
    """d loss / d W and d loss / d x equal those of the digital layer (the STE reference),
    whatever the sampled chip read in the forward pass."""
    torch.manual_seed(0)
    digital = nn.Linear(24, 6)
    cfg = st.RRAMConfig(material="taox_hfox", write_verify_iters=1)
    layer = st.RRAMLinear.from_linear(copy.deepcopy(digital), cfg, program=False)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(5))
    upstream = torch.randn(5, 6, generator=torch.Generator().manual_seed(6))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with hwa_noise(layer):
        (layer(x1) * upstream).sum().backward()
    (digital(x2) * upstream).sum().backward()
    torch.testing.assert_close(layer.weight.grad, upstream.t() @ x)
    torch.testing.assert_close(layer.weight.grad, digital.weight.grad)
    torch.testing.assert_close(layer.bias.grad, digital.bias.grad)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_noise_free_hwa_quantisation_matches_the_inference_read(kind):
    """Exact conductances, 6-bit DAC and ADC (calibrated ranges): the HWA read and the
    programmed layer's inference read agree, and both differ from the float product."""
    torch.manual_seed(0)
    cfg = st.RRAMConfig(material="ideal", dac_bits=6, adc_bits=6, read_noise=False)
    if kind == "linear":
        digital = nn.Sequential(nn.Linear(48, 10))
        x = torch.randn(16, 48, generator=torch.Generator().manual_seed(8))
    else:
        digital = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1))
        x = torch.randn(4, 3, 7, 7, generator=torch.Generator().manual_seed(8))
    programmed = st.convert_(copy.deepcopy(digital), cfg, progress=False)
    noisy = st.convert_(copy.deepcopy(digital), cfg, program=False, progress=False)
    with torch.no_grad():
        y_inference = programmed(x)
        with hwa_noise(noisy):
            y_hwa = noisy(x)
        y_float = digital(x)
    torch.testing.assert_close(y_hwa, y_inference, rtol=0, atol=1e-6)
    assert (y_hwa - y_float).abs().max() > 1e-3


def test_weight_clipping_bounds_each_layer_at_sigma_std():
    torch.manual_seed(0)
    model = st.convert_(_cnn(), st.RRAMConfig(), program=False, progress=False)
    stds = [float(m.weight.detach().std()) for m in model if hasattr(m, "rram_config")]
    clip_weights_(model, 1.5)
    for m, s in zip([m for m in model if hasattr(m, "rram_config")], stds, strict=True):
        assert float(m.weight.detach().abs().max()) <= 1.5 * s + 1e-7


def test_switching_noise_off_restores_programmed_reads():
    torch.manual_seed(0)
    layer = st.RRAMLinear(16, 4, config=st.RRAMConfig(material="epiram"))
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        layer(x)
        events = layer.rram_stats.programming_events
        hwa_noise_(layer)
        layer(x)
        assert not layer.is_programmed
        hwa_noise_(layer, False)
        layer(x)
        layer(x)
    assert layer.is_programmed
    assert layer.rram_stats.programming_events == events + 1


def test_train_hwa_mode_is_checked():
    assert hwa_mode_of({}) == "noise"
    assert hwa_mode_of({"hwa": "reprogram"}) == "reprogram"
    assert hwa_mode_of({"hwa": False}) == "none"
    with pytest.raises(ValueError, match=r"train\.hwa must be one of noise, reprogram, none"):
        hwa_mode_of({"hwa": "bogus"})
    with pytest.raises(ValueError, match=r"train\.hwa_weight_clip"):
        hwa_mode_of({"hwa_weight_clip": -1})
    with pytest.raises(ValueError, match=r"train\.hwa_weight_noise"):
        hwa_mode_of({"hwa_weight_noise": -0.1})
    with pytest.raises(ValueError, match=r"train\.hwa_weight_clip_per_channel"):
        hwa_mode_of({"hwa_weight_clip_per_channel": "yes"})


def test_noisy_reads_follow_a_reconfigured_material():
    """After reconfigure_ the sampled chip has the new material's programming error."""
    torch.manual_seed(0)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(12))
    layer = st.RRAMLinear(256, 64, config=st.RRAMConfig(material="ideal", dac_bits=None))
    x = torch.eye(256)[:64]
    spreads = []
    with torch.no_grad():
        layer.weight.copy_(w)
        with hwa_noise(layer):
            for material in ("ideal", "taox_hfox"):
                layer.reconfigure_(
                    st.RRAMConfig(
                        material=material,
                        write_verify_iters=1,
                        dac_bits=None,
                        adc_bits=None,
                        read_noise=False,
                    )
                )
                spreads.append(float((layer(x) - layer.bias - x @ w.t()).std()))
    assert spreads[0] < 1e-5 < 1e-2 < spreads[1]


def test_per_channel_weight_clipping_bounds_each_output_channel_at_sigma_std():
    # aihwkit-lightning's LAYER_GAUSSIAN_PER_CHANNEL: row r of a linear weight (output
    # channel r of a conv, over its in_channels x kh x kw weights) is clamped to sigma x its
    # own std; NumPy reference on fresh seeded weights with outliers
    torch.manual_seed(4)
    model = st.convert_(_cnn(), st.RRAMConfig(), program=False, progress=False)
    layers = [m for m in model if hasattr(m, "rram_config")]
    with torch.no_grad():
        for m in layers:
            m.weight.view(-1)[::7] *= 6.0  # outliers in many channels
    before = [m.weight.detach().numpy().copy() for m in layers]
    clip_weights_(model, 2.5, per_channel=True)
    for m, w in zip(layers, before, strict=True):
        rows = w.reshape(w.shape[0], -1)
        bound = 2.5 * rows.std(axis=1, ddof=1, keepdims=True)
        want = np.clip(rows, -bound, bound).reshape(w.shape)
        np.testing.assert_allclose(m.weight.detach().numpy(), want, rtol=0, atol=1e-7)
        assert (np.abs(want) < np.abs(w)).any()  # something was clipped


def test_weight_noise_adds_gaussian_weight_noise_in_column_max_units():
    # aihwkit-lightning's ADD_NORMAL_PER_CHANNEL on our mapping: on an ideal device without
    # converters the read is x @ (W + sigma * colmax * n)^T, so each output's variance over
    # fresh chips is sigma^2 colmax_c^2 ||x||^2 (closed form). Input 0 carries every row's
    # largest weight (the window's edge, where draws clamp) and is 0; the others stay within
    # half the window. sigma = 0 is the plain noise-free read
    torch.manual_seed(0)
    digital = nn.Linear(40, 12, bias=False)
    with torch.no_grad():
        digital.weight[:, 0] = 2 * digital.weight[:, 1:].abs().amax(1)
    cfg = st.RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)
    layer = st.RRAMLinear.from_linear(copy.deepcopy(digital), cfg, program=False)
    x = torch.randn(1, 40, generator=torch.Generator().manual_seed(3))
    x[0, 0] = 0.0
    sigma, n = 0.05, 800
    with torch.no_grad():
        with hwa_noise(layer, weight_noise=sigma):
            ys = torch.cat([layer(x) for _ in range(n)]).double()
        with hwa_noise(layer):
            torch.testing.assert_close(layer(x), digital(x), rtol=1e-5, atol=1e-5)
    colmax = digital.weight.detach().abs().amax(1).double()
    pred = sigma**2 * colmax**2 * float(x.double().square().sum())
    ratio = ys.var(0) / pred
    assert torch.all((ratio - 1).abs() < 5 * math.sqrt(2 / n)), ratio
    torch.testing.assert_close(ys.mean(0), digital(x).double()[0], rtol=0, atol=0.02)
    with pytest.raises(ValueError, match="weight_noise"):
        st.rram.hwa_noise_(layer, True, weight_noise=-1)
