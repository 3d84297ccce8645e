"""First-order correction with the compiled reads: ``A x~`` (which writes x onto cells)
runs in PyTorch, the two reads of the programmed matrix (``A~ x``, ``A~ x~``) in the
compiled fused read. Checked against the all-PyTorch path of the same layer state (same
programmed conductances, same programmed x~), which the NumPy tests of test_crossbar.py
and test_read_noise.py pin to the formula."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from sedma_torch.rram import (
    RRAMConfig,
    RRAMConv2d,
    RRAMLinear,
    get_material,
    native_depthwise,
    native_rng,
    register_material,
)


def counted(monkeypatch, module, name: str) -> list:
    """``module.name`` wrapped (restored by ``monkeypatch``) to record each call (a list of
    1s); the kernel still runs."""
    kernel, calls = getattr(module, name), []

    def counting(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def _pytorch_only(layer):
    """A copy of ``layer`` that always takes the PyTorch reads."""
    other = copy.deepcopy(layer)
    other._native_ok = lambda x, first_order_hybrid=False: False  # type: ignore[method-assign]
    return other


@pytest.mark.skipif(not native_rng.available(), reason="needs the compiled kernels (a C compiler)")
@pytest.mark.parametrize("adc_ranging", ["calibrated", "per_read"])
@pytest.mark.parametrize("dac_bits", [8, None])
def test_compiled_first_order_reads_equal_the_pytorch_reads(dac_bits, adc_ranging, monkeypatch):
    cfg = RRAMConfig(
        material="ag_asi",
        tile_rows=40,
        tile_cols=16,
        dac_bits=dac_bits,
        adc_bits=8,
        adc_ranging=adc_ranging,
        read_noise=False,
        correction="first_order",
        seed=11,
    )
    torch.manual_seed(3)
    layer = RRAMLinear(100, 37, config=cfg)
    x = torch.randn(33, 100, generator=torch.Generator().manual_seed(4))
    layer.program_()
    reference = _pytorch_only(layer)
    calls = counted(monkeypatch, native_rng, "fused_read_")
    with torch.no_grad():
        y = layer(x).numpy()
        compiled_reads = len(calls)
        want = reference(x).numpy()
    assert compiled_reads == 2  # A~ x and A~ x~ compiled
    assert layer.rram_stats.as_dict() == reference.rram_stats.as_dict()
    # float32 summation order differs: a value may cross an ADC decision (one step)
    close = np.abs(y - want) <= 1e-4 * np.abs(want).max()
    assert close.mean() > 0.97
    exact = x.numpy() @ layer.weight.detach().numpy().T + layer.bias.detach().numpy()
    err = np.linalg.norm(y - exact) / np.linalg.norm(exact)
    err_ref = np.linalg.norm(want - exact) / np.linalg.norm(exact)
    assert abs(err - err_ref) < 0.05 * err_ref


@pytest.mark.skipif(not native_rng.available(), reason="needs the compiled kernels (a C compiler)")
def test_compiled_first_order_read_noise_has_the_pytorch_variance():
    """With read noise on, the compiled and PyTorch paths draw different streams: their
    outputs agree in distribution (the spread around the exact product), with read noise
    (5 %) dominating the spread."""
    material = dataclasses.replace(
        get_material("epiram"), name="epiram_noisy_test", read_noise=0.05
    )
    register_material(material, overwrite=True)
    base = dict(tile_rows=32, tile_cols=8, adc_bits=12, seed=5, correction="first_order")
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(6))
    spreads = {}
    for name, read_noise in (("noisy", True), ("quiet", False)):
        torch.manual_seed(0)
        layer = RRAMLinear(
            64,
            24,
            bias=False,
            config=RRAMConfig(material=material.name, read_noise=read_noise, **base),
        )
        layer.program_()
        reference = _pytorch_only(layer)
        exact = x @ layer.weight.detach().t()
        with torch.no_grad():
            spreads[name] = ((layer(x) - exact).std().item(), (reference(x) - exact).std().item())
    compiled, pytorch = spreads["noisy"]
    assert pytorch > 3 * spreads["quiet"][1]  # read noise dominates the spread
    assert 0.9 < compiled / pytorch < 1.1


@pytest.mark.skipif(
    not (native_rng.available() and native_depthwise.available()),
    reason="needs the compiled kernels (a C compiler)",
)
@pytest.mark.parametrize("groups", [1, 6], ids=["conv", "depthwise"])
@pytest.mark.parametrize("dac_bits", [8, None])
def test_compiled_first_order_conv_reads_equal_the_pytorch_reads(groups, dac_bits, monkeypatch):
    cfg = RRAMConfig(
        material="alox_hfo2",
        tile_rows=30,
        tile_cols=5,
        dac_bits=dac_bits,
        adc_bits=8,
        read_noise=False,
        correction="first_order",
        seed=2,
    )
    torch.manual_seed(7)
    layer = RRAMConv2d(6, 12, 3, padding=1, groups=groups, config=cfg)
    layer.program_()
    reference = _pytorch_only(layer)
    x = torch.randn(5, 6, 9, 8, generator=torch.Generator().manual_seed(8))
    module = native_depthwise if groups > 1 else native_rng
    name = "depthwise_read_" if groups > 1 else "fused_conv_read_"
    calls = counted(monkeypatch, module, name)
    with torch.no_grad():
        y = layer(x).numpy()
        compiled_reads = len(calls)
        want = reference(x).numpy()
    assert compiled_reads == 2  # A~ x and A~ x~ compiled
    assert layer.rram_stats.as_dict() == reference.rram_stats.as_dict()
    close = np.abs(y - want) <= 1e-4 * np.abs(want).max()
    assert close.mean() > 0.97
    exact = torch.nn.functional.conv2d(
        x, layer.weight.detach(), layer.bias.detach(), padding=1, groups=groups
    ).numpy()
    err = np.linalg.norm(y - exact) / np.linalg.norm(exact)
    err_ref = np.linalg.norm(want - exact) / np.linalg.norm(exact)
    assert abs(err - err_ref) < 0.05 * err_ref
