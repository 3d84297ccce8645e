"""Hardware-aware training: training through the crossbar beats training digitally and converting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import sedma_torch as st


def _digits():
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, y, perm[:1400], perm[1400:]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _train(model, x, y, train_idx, epochs=15):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for i in range(0, len(train_idx), 64):
            idx = train_idx[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


def _accuracy(model, x, y, test_idx, repeats=5) -> float:
    with torch.no_grad():
        return float(
            np.mean(
                [
                    (model(x[test_idx]).argmax(1) == y[test_idx]).float().mean()
                    for _ in range(repeats)
                ]
            )
        )


def test_hardware_aware_training_beats_digital_training_then_conversion():
    # Open-loop programming (one write, no verify) of Ag-aSi leaves large programming
    # errors; training through the crossbar lets the network adapt to them. Three chips
    # (config seeds), so the comparison does not rest on one noise realisation.
    x, y, train_idx, test_idx = _digits()
    digital = _train(_mlp(), x, y, train_idx)
    acc_digital = _accuracy(digital, x, y, test_idx)
    gains = []
    for seed in range(3):
        cfg = st.RRAMConfig(
            material="ag_asi", tile_rows=64, tile_cols=64, write_verify_iters=1, seed=seed
        )
        converted = st.convert_(_train(_mlp(), x, y, train_idx), cfg, progress=False)
        acc_converted = _accuracy(converted, x, y, test_idx)
        hwa = st.convert_(_mlp(), cfg, progress=False)
        _train(hwa, x, y, train_idx)
        acc_hwa = _accuracy(hwa, x, y, test_idx)
        print(
            f"chip {seed}: digital {acc_digital:.3f}  converted {acc_converted:.3f}  "
            f"hardware-aware {acc_hwa:.3f}"
        )
        assert acc_converted < acc_digital  # the device costs accuracy
        gains.append(acc_hwa - acc_converted)
    assert min(gains) > 0
    assert float(np.mean(gains)) > 0.005


@pytest.mark.parametrize("material", ["ideal", "taox_hfox"])
def test_training_reprograms_after_each_step(material):
    cfg = st.RRAMConfig(material=material, tile_rows=32, tile_cols=32)
    layer = st.RRAMLinear(40, 8, config=cfg)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(1))
    for step in range(3):
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()
        assert not layer.is_programmed
        layer(x)
        assert layer.is_programmed
        assert layer.rram_stats.programming_events == step + 2
