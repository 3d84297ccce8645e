"""Inputs a converter cannot digitise (issue 16 item 9): NaN/Inf with ``check_finite=False``,
magnitudes whose squares overflow, and tile sizes no chip has.

References are the digital layers (``nn.Linear``/``nn.Conv2d``): which outputs are not
finite, and the exact power-of-two equivariance of a read whose ranges are set per vector.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sedma_torch.rram import RRAMConfig, RRAMConv2d, RRAMLinear
from sedma_torch.rram.config import MAX_TILE

# every read path a float32 CPU layer takes: the compiled fused read (DAC + ADC), the
# no-converter GEMM with state-dependent noise, and first-order correction on both
SETTINGS = [
    ("ideal", 8, "none"),
    ("ideal", 8, "first_order"),
    ("taox_hfox", None, "none"),
    ("taox_hfox", None, "first_order"),
    ("taox_hfox", 8, "none"),
    ("taox_hfox", 8, "first_order"),
]


def _config(material, bits, correction, **kw):
    return RRAMConfig(
        material=material, dac_bits=bits, adc_bits=bits, correction=correction, seed=41, **kw
    )


@pytest.mark.parametrize(("material", "bits", "correction"), SETTINGS)
def test_nan_and_inf_inputs_give_nan_where_the_digital_layer_is_not_finite(
    material, bits, correction
):
    gen = torch.Generator().manual_seed(1234)
    lin = nn.Linear(12, 5)
    x = torch.randn(4, 12, generator=gen)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    layer = RRAMLinear.from_linear(lin, _config(material, bits, correction, check_finite=False))
    with torch.no_grad():
        y, ref = layer(x), lin(x)
    assert torch.equal(torch.isfinite(y), torch.isfinite(ref))
    assert torch.isnan(y[1]).all() and not torch.isfinite(y[2]).any()
    # the clean rows are read as they would be without the bad rows' NaN in the batch
    # (before the fix a NaN row could poison the batch's converter ranges)
    clean = y[[0, 3]]
    err = (clean - ref[[0, 3]]).norm() / ref[[0, 3]].norm()
    assert torch.isfinite(clean).all() and err < (0.05 if material == "ideal" else 0.6)


@pytest.mark.parametrize(("material", "bits", "correction"), SETTINGS[:3])
def test_conv_nan_marks_exactly_the_receptive_fields_that_saw_it(material, bits, correction):
    gen = torch.Generator().manual_seed(77)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, dilation=1)
    x = torch.randn(2, 4, 9, 9, generator=gen)
    x[0, 1, 4, 4] = float("nan")  # group 0 only
    x[1, 3, 0, 0] = float("-inf")  # group 1, a corner (one output position)
    layer = RRAMConv2d.from_conv(conv, _config(material, bits, correction, check_finite=False))
    with torch.no_grad():
        y, ref = layer(x), conv(x)
    bad = ~torch.isfinite(ref)
    assert torch.equal(~torch.isfinite(y), bad)
    assert 0 < int(bad.sum()) < bad.numel() // 4  # the mask is neither empty nor everything


@pytest.mark.parametrize(("material", "bits", "correction"), SETTINGS)
def test_huge_inputs_read_exactly_as_their_power_of_two_scaled_copy(material, bits, correction):
    # rows with max |x| in [0.5, 1): 2^100 times them is read as 2^100 times their read
    gen = torch.Generator().manual_seed(99)
    lin = nn.Linear(16, 6, bias=False)  # the bias is added digitally, after the read
    x = torch.rand(3, 16, generator=gen) * 1.8 - 0.9
    x = x / x.abs().amax(dim=1, keepdim=True) * 0.75
    cfg = _config(material, bits, correction)
    with torch.no_grad():
        chip = RRAMLinear.from_linear(lin, cfg)
        twin = copy.deepcopy(chip)  # the same chip: same conductances and noise stream
        small = chip(x)
        big = twin(torch.ldexp(x, torch.tensor(100.0)))
        ref = lin(torch.ldexp(x, torch.tensor(100.0)))
    assert torch.isfinite(big).all() and torch.isfinite(ref).all()
    assert torch.equal(big, torch.ldexp(small, torch.tensor(100.0)))
    err = (big.double() - ref.double()).norm() / ref.double().norm()
    assert err < (0.05 if material == "ideal" else 0.6)


def test_huge_conv_inputs_stay_finite():
    gen = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6, generator=gen) * 1e36
    layer = RRAMConv2d.from_conv(conv, _config("taox_hfox", None, "none"))
    with torch.no_grad():
        y, ref = layer(x), conv(x)
    assert torch.isfinite(ref).all() and torch.isfinite(y).all()
    assert (y.double() - ref.double()).norm() / ref.double().norm() < 0.6


def test_fixed_input_range_saturates_huge_inputs_as_a_chip_does():
    # a DAC range fixed in input units clips: the output is bounded, not scaled
    lin = nn.Linear(8, 4)
    gen = torch.Generator().manual_seed(3)
    layer = RRAMLinear.from_linear(lin, _config("taox_hfox", 8, "none", dac_range=4.0))
    with torch.no_grad():
        y = layer(torch.randn(2, 8, generator=gen) * 1e36)
    bound = lin.weight.abs().sum(1).max() * 4.0 * 2 + lin.bias.abs().max()
    assert torch.isfinite(y).all() and y.abs().max() < bound


def test_tile_sizes_are_bounded_by_a_physical_crossbar():
    with pytest.raises(ValueError, match=r"tile_rows must be 1\.\.4096.*physical crossbar"):
        RRAMConfig(tile_rows=10**9)
    with pytest.raises(ValueError, match="tile_cols"):
        RRAMConfig(tile_cols=MAX_TILE + 1)
    cfg = RRAMConfig(material="ideal", tile_rows=MAX_TILE, tile_cols=MAX_TILE)
    layer = RRAMLinear.from_linear(nn.Linear(4, 8), cfg)
    with torch.no_grad():
        assert layer(torch.ones(1, 4)).shape == (1, 8)
