"""`mvm` inputs and errors, presets and config round trips."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch

import sedma_torch as st
from sedma_torch.rram import RRAMConfig, mvm

IDEAL = RRAMConfig(material="ideal", dac_bits=None, adc_bits=None, tile_rows=16, tile_cols=8)


def test_mvm_accepts_numpy_and_sparse_matrices_and_vector_blocks():
    rng = np.random.default_rng(11)
    a = rng.normal(size=(30, 20))
    x = rng.normal(size=(20, 3))
    dense = mvm(a, x, IDEAL, compare=True)
    sparse = mvm(scipy.sparse.csr_matrix(a), x[:, 0], IDEAL, compare=True)
    np.testing.assert_allclose(dense.y.numpy(), a @ x, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(sparse.y.numpy(), a @ x[:, 0], rtol=1e-10, atol=1e-10)
    assert dense.y.shape == (30, 3) and sparse.y.shape == (30,)
    assert dense.stats["rel_l2"] < 1e-12 and dense.stats["rel_linf"] < 1e-12
    # 3 vectors, 2 input tiles (20 rows / 16) x 4 column tiles (30 cols / 8)
    assert dense.stats["matrix_products"] == 3 and dense.stats["tile_reads"] == 3 * 2 * 4


def test_mvm_reports_the_error_it_measures():
    rng = np.random.default_rng(12)
    a, x = rng.normal(size=(40, 40)), rng.normal(size=40)
    res = mvm(a, x, RRAMConfig(material="taox_hfox", tile_rows=16, tile_cols=16), compare=True)
    err = res.y.numpy() - a @ x
    assert res.stats["rel_l2"] == pytest.approx(np.linalg.norm(err) / np.linalg.norm(a @ x))
    assert res.stats["rel_linf"] == pytest.approx(np.abs(err).max() / np.abs(a @ x).max())
    assert res.stats["rel_l2"] > 1e-3  # a noisy device is not exact


@pytest.mark.parametrize(
    ("a", "x", "error", "match"),
    [
        (np.ones(5), np.ones(5), ValueError, "matrix"),
        (np.ones((4, 5)), np.ones(4), ValueError, r"\(5,\)"),
        (np.ones((4, 5)), np.ones((5, 2, 1)), ValueError, "x must have shape"),
        (np.ones((4, 5), dtype=np.complex128), np.ones(5), TypeError, "real"),
        ([[1.0, 2.0]], np.ones(2), TypeError, "numpy"),
        (np.full((2, 2), np.nan), np.ones(2), ValueError, "NaN"),
    ],
)
def test_mvm_rejects_bad_input_with_a_clear_error(a, x, error, match):
    with pytest.raises(error, match=match):
        mvm(a, x, IDEAL)


def test_presets_are_valid_configs_and_take_overrides():
    for name in st.PRESETS:
        cfg = st.preset(name)
        assert isinstance(cfg, RRAMConfig)
    assert st.preset("ideal").is_exact
    assert st.preset("meliso").correction == "first_order"
    assert st.preset("epiram", tile_rows=64).tile_rows == 64
    with pytest.raises(ValueError, match="known presets"):
        st.preset("no_such_preset")


def test_config_to_dict_round_trips_and_is_frozen():
    cfg = RRAMConfig(material="ag_asi", adc_bits=6, correction="first_order", seed=3)
    data = cfg.to_dict()
    assert data["material"] == "ag_asi"
    assert RRAMConfig(**data) == cfg
    with pytest.raises(AttributeError):
        cfg.seed = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match="adc_bits"):
        cfg.replace(adc_bits=0)


def test_exactness_flag_follows_every_non_ideality():
    assert IDEAL.is_exact
    for change in (
        {"dac_bits": 8},
        {"adc_bits": 8},
        {"stuck_at_gmin_prob": 0.01},
        {"wire_resistance_ohm": 1.0},
        {"material": "epiram"},
    ):
        assert not IDEAL.replace(**change).is_exact
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    layer = st.RRAMLinear(20, 30, config=IDEAL)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
