"""Demo of the RRAM layers on real data that ships with scikit-learn (no download).

Trains a small CNN on the bundled handwritten digits, converts it to each RRAM material
with and without first-order correction, and prints accuracy, throughput, crossbar
utilisation and crossbar products; saves a plot to results/demo_layers.png.

    python scripts/demo_layers.py [--epochs 8] [--out results]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn
from tqdm.auto import tqdm

import sedma_torch as st

MATERIALS = ["epiram", "ag_asi", "alox_hfo2", "taox_hfox"]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )


def load() -> tuple[torch.Tensor, ...]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        start = time.perf_counter()
        pred = torch.cat([model(x[i : i + 128]).argmax(1) for i in range(0, len(x), 128)])
        elapsed = time.perf_counter() - start
    return float((pred == y).float().mean()), len(x) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load()
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in tqdm(range(args.epochs), desc="digital training"):
        model.train()
        for i in range(0, len(xtr), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[i : i + 64]), ytr[i : i + 64]).backward()
            opt.step()
    acc, speed = evaluate(model, xte, yte)
    rows = [
        {
            "material": "digital",
            "correction": "-",
            "accuracy": acc,
            "samples_per_s": speed,
            "utilisation": None,
            "crossbar_products": 0,
        }
    ]
    for material in tqdm(MATERIALS, desc="materials"):
        for correction in ("none", "first_order"):
            cfg = st.RRAMConfig(
                material=material, tile_rows=128, tile_cols=128, correction=correction
            )
            rram = st.convert_(copy.deepcopy(model), cfg, progress=False)
            acc, speed = evaluate(rram, xte, yte)
            products = sum(
                m.rram_stats.matrix_products for m in rram.modules() if hasattr(m, "rram_stats")
            )
            rows.append(
                {
                    "material": material,
                    "correction": correction,
                    "accuracy": acc,
                    "samples_per_s": speed,
                    "utilisation": st.summary(rram).utilisation,
                    "crossbar_products": products,
                }
            )
    print(
        f"\n{'material':10s} {'correction':12s} {'accuracy':>8s} {'samples/s':>10s} "
        f"{'xbar util':>9s} {'products':>9s}"
    )
    for r in rows:
        util = "-" if r["utilisation"] is None else f"{r['utilisation']:.1%}"
        print(
            f"{r['material']:10s} {r['correction']:12s} {r['accuracy']:8.3f} "
            f"{r['samples_per_s']:10.0f} {util:>9s} {r['crossbar_products']:>9d}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_layers.json").write_text(json.dumps(rows, indent=2))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, correction in enumerate(("none", "first_order")):
        sub = [r for r in rows if r["correction"] == correction]
        ax.bar(
            [i + 0.4 * k for i in range(len(sub))],
            [r["accuracy"] for r in sub],
            width=0.4,
            label=f"correction={correction}",
        )
    ax.axhline(rows[0]["accuracy"], color="k", ls="--", label="digital")
    ax.set_xticks([i + 0.2 for i in range(len(MATERIALS))], MATERIALS)
    ax.set_ylabel("test accuracy (digits)")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out / "demo_layers.png", dpi=120)
    print(f"\nsaved {args.out / 'demo_layers.png'} and {args.out / 'demo_layers.json'}")


if __name__ == "__main__":
    main()
