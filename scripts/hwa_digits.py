"""Hardware-aware training vs digital training + conversion on scikit-learn's digits.

MLP 64-64-10, 15 epochs of Adam, open-loop programming (one write, no verify) so the
device error is large; for each material/converter setting and chip seed, prints the
test accuracy of the digital model, of the digital model converted, and of the same
model trained through the crossbar. Results to results/hwa_digits.json.

    python scripts/hwa_digits.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from tqdm.auto import tqdm

import sedma_torch as st

SETTINGS = [("ag_asi", 8, 8), ("alox_hfo2", 4, 4)]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train(model: nn.Module, x, y, idx, epochs: int = 15) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for i in range(0, len(idx), 64):
            batch = idx[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    return model


def accuracy(model: nn.Module, x, y, idx, repeats: int = 5) -> float:
    with torch.no_grad():
        return float(
            np.mean([(model(x[idx]).argmax(1) == y[idx]).float().mean() for _ in range(repeats)])
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = perm[:1400], perm[1400:]
    acc_digital = accuracy(train(mlp(), x, y, train_idx), x, y, test_idx)
    rows = []
    runs = [(s, seed) for s in SETTINGS for seed in range(args.seeds)]
    for (material, dac_bits, adc_bits), seed in tqdm(runs, desc="chips"):
        cfg = st.RRAMConfig(
            material=material,
            tile_rows=64,
            tile_cols=64,
            write_verify_iters=1,
            dac_bits=dac_bits,
            adc_bits=adc_bits,
            seed=seed,
        )
        converted = st.convert_(train(mlp(), x, y, train_idx), cfg, progress=False)
        hwa = st.convert_(mlp(), cfg, progress=False)
        train(hwa, x, y, train_idx)
        rows.append(
            {
                "material": material,
                "dac_bits": dac_bits,
                "adc_bits": adc_bits,
                "seed": seed,
                "digital": acc_digital,
                "converted": accuracy(converted, x, y, test_idx),
                "hardware_aware": accuracy(hwa, x, y, test_idx),
            }
        )
    print(
        f"\n{'material':10s} {'dac/adc':>7s} {'seed':>4s} {'digital':>8s} {'converted':>9s} "
        f"{'HWA':>6s}"
    )
    for r in rows:
        print(
            f"{r['material']:10s} {r['dac_bits']:>3d}/{r['adc_bits']:<3d} {r['seed']:>4d} "
            f"{r['digital']:8.3f} {r['converted']:9.3f} {r['hardware_aware']:6.3f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hwa_digits.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
