"""Adaptive lambda (SPEC.md Eq. 5-6) against a dense grid search, and wired to the dual memory."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

import sedma_torch as st
from sedma_torch.memory import LongTermMemory, ShortTermMemory
from sedma_torch.rram.correction import default_lambda_grid
from sedma_torch.rram.lambda_control import mix_lambda

OUT, INP, CALLS = 96, 192, 24


def _smooth_weight(gen: torch.Generator) -> torch.Tensor:
    """Rows vary slowly along the output index: low-frequency cosines in i."""
    t = torch.linspace(0, 1, OUT).unsqueeze(1)
    freqs = torch.arange(1, 4, dtype=torch.float32)
    return torch.cos(math.pi * t * freqs) @ torch.randn(3, INP, generator=gen) / 3


def _rough_weight(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(OUT, INP, generator=gen) / 16


def _config(**kw) -> st.RRAMConfig:
    base = dict(
        material="taox_hfox",
        dac_bits=None,
        adc_bits=None,
        denoise="adaptive",
        calibration_interval=1,
        calibration_rows=32,
        seed=3,
    )
    base.update(kw)
    return st.RRAMConfig(**base)


def _layer(weight: torch.Tensor, cfg: st.RRAMConfig) -> st.RRAMLinear:
    lin = nn.Linear(INP, OUT, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return st.RRAMLinear.from_linear(lin, cfg, seed=11)


def _run(layer: st.RRAMLinear, gen: torch.Generator, calls: int = CALLS) -> None:
    with torch.no_grad():
        for _ in range(calls):
            layer(torch.randn(32, INP, generator=gen))


def _dense_errors(weight: torch.Tensor, cfg: st.RRAMConfig, gen: torch.Generator, lams):
    """Relative error of (I + lam L^T L)^-1 p for each lam, by dense NumPy solves on fresh
    inputs; p from a twin layer with the same programmed state and no denoising."""
    twin = _layer(weight, dataclasses.replace(cfg, denoise="none"))
    x = torch.randn(256, INP, generator=gen)
    with torch.no_grad():
        p = twin(x).double().numpy()
    y = (x.double() @ weight.double().t()).numpy()
    lap = np.diff(np.eye(OUT), axis=0)  # L[i, i] = -1, L[i, i+1] = 1
    ltl = lap.T @ lap
    power = (y**2).mean()
    return np.array(
        [
            ((np.linalg.solve(np.eye(OUT) + lam * ltl, p.T).T - y) ** 2).mean() / power
            for lam in lams
        ]
    )


def _adapt_and_grid_search(weight_fn, seed: int):
    """Run the adaptive layer, then the dense errors of every grid lambda and of the
    layer's lambda on the same fresh inputs."""
    gen = torch.Generator().manual_seed(seed)
    w = weight_fn(gen)
    cfg = _config()
    layer = _layer(w, cfg)
    _run(layer, gen)
    grid = default_lambda_grid().numpy()
    errs = _dense_errors(w, cfg, gen, [*grid.tolist(), layer.last_lambda])
    return layer, errs[:-1], errs[-1]


def test_adaptive_lambda_matches_grid_search_on_smooth_outputs():
    layer, errs, err_t = _adapt_and_grid_search(_smooth_weight, 0)
    assert layer.workload_type.endswith("/smooth")
    assert layer.lambda_converged
    # the chosen lambda is as good as the best on the grid, and far better than no denoising
    assert err_t <= 1.05 * errs.min()
    assert errs.min() < 0.5 * errs[0]
    assert layer.last_lambda >= 0.1


def test_adaptive_lambda_is_near_zero_on_rough_outputs():
    layer, errs, err_t = _adapt_and_grid_search(_rough_weight, 1)
    assert layer.workload_type.endswith("/rough")
    assert layer.last_lambda <= 0.1
    assert err_t <= 1.02 * errs.min()
    # denoising buys (almost) nothing here: the best lambda is within 5% of no denoising
    assert errs.min() >= 0.95 * errs[0]


def test_lambda_is_written_to_and_read_from_long_term_memory(tmp_path):
    gen = torch.Generator().manual_seed(2)
    w = _smooth_weight(gen)
    cfg = _config()
    with LongTermMemory(tmp_path / "m.db") as ltm:
        first = _layer(w, cfg)
        first.attach_memory(ltm)
        _run(first, gen)
        stored = ltm.best_lambda("taox_hfox", first.workload_type)
        assert stored is not None
        lam_stored, err_stored = stored
        assert math.isfinite(err_stored) and err_stored > 0
        steps_without_memory = first.calibration_steps

        second = _layer(w, dataclasses.replace(cfg, seed=4))
        second.attach_memory(ltm)
        _run(second, gen, calls=1)
        # the remembered lambda is read, accepted by the first calibration, and mixed in
        assert second.lambda_memory == pytest.approx(lam_stored)
        assert second.lambda_converged and second.calibration_steps == 1
        assert steps_without_memory >= 3
        # lam_t is the mix on the log scale (0 on the grid read as its smallest positive point)
        alpha = cfg.denoise_alpha
        floor = default_lambda_grid().numpy()[1]
        lm, lr = np.maximum([lam_stored, second._lambda_recent], floor)
        expected = np.exp(alpha * np.log(lm) + (1 - alpha) * np.log(lr))
        assert second.last_lambda == pytest.approx(float(expected), rel=1e-12)


def test_lambda_t_is_the_geometric_mix_of_memory_and_recent():
    rng = np.random.default_rng(31)
    grid = default_lambda_grid().numpy()
    for alpha in [0.0, 0.25, 0.5, 0.9, 1.0]:
        lm, lr = rng.choice(grid[1:], size=2, replace=False)
        got = mix_lambda(float(lm), float(lr), alpha)
        assert got == pytest.approx(lm**alpha * lr ** (1 - alpha), rel=1e-12)
        if 0 < alpha < 1:  # strictly between, on the log scale: not the arithmetic mean
            assert min(lm, lr) < got < max(lm, lr)
            assert got < alpha * lm + (1 - alpha) * lr
    # 0 on the grid counts as its smallest positive point; 0 with 0 stays 0
    assert mix_lambda(0.0, 1.0, 0.5) == pytest.approx(math.sqrt(grid[1]), rel=1e-12)
    assert mix_lambda(0.0, 0.0, 0.5) == 0.0
    assert mix_lambda(0.0, 1.0, 1.0) == 0.0 and mix_lambda(1.0, 0.0, 0.0) == 0.0

    # in a layer: every call's lambda is the NumPy geometric mix of lambda_memory and lam_recent
    gen = torch.Generator().manual_seed(32)
    cfg = _config(denoise_alpha=0.3, seed=7)
    layer = _layer(_smooth_weight(gen), cfg)
    lam_memory = float(rng.choice(grid[20:35]))
    layer.lambda_memory, layer._lambda_looked_up = lam_memory, True  # as read from an LTM
    recent = []
    with torch.no_grad():
        for _ in range(6):
            layer(torch.randn(32, INP, generator=gen))
            recent.append((layer._lambda_recent, layer.last_lambda))
    for lr, lam_t in recent:
        lr = max(lr, grid[1])
        assert lam_t == pytest.approx(np.exp(0.3 * np.log(lam_memory) + 0.7 * np.log(lr)))


def test_short_term_windows_are_shared_and_can_be_switched_off():
    gen = torch.Generator().manual_seed(3)
    w = _smooth_weight(gen)
    stm = ShortTermMemory(window=5)
    layer = _layer(w, _config())
    layer.attach_memory(None, stm)
    _run(layer, gen, calls=3)
    keys = [k for k in list(stm.keys()) if "/lambda_error/" in k]
    assert len(keys) == len(default_lambda_grid())
    assert all(stm.count(k) == layer.calibration_steps for k in keys)
    # without windows the latest calibration alone decides lam_recent
    nowin = _layer(w, _config())
    nowin.attach_memory(None, False)
    _run(nowin, gen, calls=2)
    assert nowin.short_term_memory is False
    assert nowin.last_lambda is not None


def test_fixed_lambda_1e12_reproduces_no_denoising_within_float_precision():
    gen = torch.Generator().manual_seed(4)
    w = _smooth_weight(gen)
    fixed = _layer(w, _config(denoise="fixed", lambda_fixed=1e-12))
    plain = _layer(w, _config(denoise="none"))
    x = torch.randn(8, INP, generator=gen)
    with torch.no_grad():
        expected = plain(x)
        # the DCT round trip rounds at the scale of each vector, not of each element
        scale = float(expected.abs().max())
        torch.testing.assert_close(fixed(x), expected, rtol=1e-5, atol=1e-6 * scale)


def test_copies_are_not_attached_to_memory(tmp_path):
    import copy

    with LongTermMemory(tmp_path / "m.db") as ltm:
        layer = _layer(_rough_weight(torch.Generator().manual_seed(5)), _config())
        layer.attach_memory(ltm, ShortTermMemory())
        clone = copy.deepcopy(layer)
        assert clone.long_term_memory is None and clone.short_term_memory is None
        assert layer.long_term_memory is ltm
