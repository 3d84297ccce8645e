"""The counter-based Gaussian stream and the fused read epilogue (opt-in fast path)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from sedma_torch.rram import RRAMConfig
from sedma_torch.rram.crossbar import _read_epilogue, adc_dequantise_
from sedma_torch.rram.rng import hash_normal, seed_words


def test_hash_normal_is_standard_normal_and_seeds_are_independent():
    a = hash_normal((200_000,), seed_words(123456789, "cpu"), "cpu", torch.float64).numpy()
    b = hash_normal((200_000,), seed_words(123456790, "cpu"), "cpu", torch.float64).numpy()
    for z in (a, b):
        assert abs(z.mean()) < 5 / np.sqrt(z.size)
        assert abs(z.var() - 1) < 0.02
        assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)
    # shifted seeds must not give shifted copies of the same stream
    assert abs(np.corrcoef(a[2:], b[:-2])[0, 1]) < 5 / np.sqrt(a.size)
    again = hash_normal((200_000,), seed_words(123456789, "cpu"), "cpu", torch.float64).numpy()
    np.testing.assert_array_equal(a, again)


@pytest.mark.parametrize("adc_range", [None, 3.0])
def test_read_epilogue_without_noise_matches_the_eager_adc(adc_range):
    cfg = RRAMConfig(material="ideal", adc_bits=6, dac_bits=8, tile_cols=16, adc_range=adc_range)
    g = torch.Generator().manual_seed(7)
    u = torch.randn(3, 5, 32, generator=g, dtype=torch.float64) * 40
    s_in = torch.rand(3, 5, 1, generator=g, dtype=torch.float64) + 0.5
    expected = adc_dequantise_(u.clone(), cfg, 127, s_in, col_dim=-1)
    params = torch.tensor(
        [31.0, 127.0, -1.0 if adc_range is None else adc_range * 127], dtype=torch.float64
    )
    got = _read_epilogue(
        u.view(3, 5, 2, 16),
        torch.zeros((), dtype=torch.float64),
        s_in.unsqueeze(-1),
        seed_words(1, "cpu"),
        params,
    ).view(3, 5, 32)
    torch.testing.assert_close(got, expected)


def test_read_epilogue_noise_has_the_requested_standard_deviation():
    params = torch.tensor([2.0**15 - 1, 1.0, -1.0])  # a fine ADC, DAC scale 1
    u = torch.zeros(64, 1, 1024)
    std = torch.full((64, 1, 1, 1), 0.5)
    out = _read_epilogue(
        u.view(64, 1, 1, 1024), std, torch.ones(64, 1, 1, 1), seed_words(99, "cpu"), params
    )
    assert abs(float(out.std()) - 0.5) < 0.01
