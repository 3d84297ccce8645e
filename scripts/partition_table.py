"""Crossbar utilisation: fixed 256x256 tiling vs memory-guided partitioning (SPEC.md Eq. 4).

Run from the repository root::

    python scripts/partition_table.py                       # ResNet-18, ResNet-50, BERT-base
    python scripts/partition_table.py --materials taox_hfox --pressure 0.5

Layer shapes only: the models are built on PyTorch's meta device (no weights, no
download). For every model and material it plans the partition with
``st.rram.plan_partition`` on the default crossbar pool without count limits (sizes
64/128/256/512, IR-drop limit per material) and compares it with every layer on 256x256
crossbars (the usual fixed tiling, which ignores the IR-drop limit): utilisation (used /
allocated cells), crossbars, and the Eq. 4 cost of both under the same cost model. Writes ``results/partition_table.json`` and a bar chart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch
from benchmark_utils import cpu_model, git_revision
from tqdm import tqdm

import sedma_torch as st
from sedma_torch.rram.partition import CrossbarPool, plan_partition

REPO_ROOT = Path(__file__).resolve().parents[1]
MATERIALS = ("epiram", "ag_asi", "alox_hfo2", "taox_hfox")


def build(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        if name == "bert-base":
            from transformers import BertConfig, BertModel

            return BertModel(BertConfig())  # the bert-base-uncased geometry
        import torchvision

        return getattr(torchvision.models, name.replace("-", ""))()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet-18", "resnet-50", "bert-base"])
    ap.add_argument("--materials", nargs="+", default=list(MATERIALS))
    ap.add_argument("--pressure", type=float, default=0.5, help="memory pressure in [0, 1]")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "partition_table.json")
    args = ap.parse_args()

    pool = CrossbarPool(counts=None)
    rows = []
    jobs = [(m, mat) for m in args.models for mat in args.materials]
    models = {m: build(m) for m in args.models}
    for model_name, material in tqdm(jobs, desc="planning"):
        cfg = st.RRAMConfig(material=material)
        model = models[model_name]
        guided = plan_partition(model, cfg, pool=pool, memory_pressure=args.pressure)
        fixed = plan_partition(
            model,
            cfg,
            pool=CrossbarPool(sizes=(256,), counts=None, wire_resistance_ohm=0.0),
            memory_pressure=args.pressure,
        )
        rows.append(
            {
                "model": model_name,
                "material": material,
                "layers": len(guided.layers),
                "max_size": pool.max_size(material),
                "fixed_util": fixed.utilisation,
                "guided_util": guided.utilisation,
                "fixed_crossbars": sum(fixed.crossbars().values()),
                "guided_crossbars": sum(guided.crossbars().values()),
                "guided_sizes": {str(k): v for k, v in sorted(guided.crossbars().items())},
                "fixed_cost": fixed.cost,
                "guided_cost": guided.cost,
                "plan_ms": guided.seconds * 1e3,
            }
        )
    head = (
        f"{'model':10s} {'material':10s} {'layers':>6s} {'max':>4s} {'util 256':>9s} "
        f"{'util guided':>11s} {'xbars 256':>9s} {'xbars guided':>12s} {'cost ratio':>10s}"
    )
    print(f"machine: {cpu_model()}  revision: {git_revision()}  pressure {args.pressure}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['model']:10s} {r['material']:10s} {r['layers']:>6d} {r['max_size']:>4d} "
            f"{r['fixed_util']:9.1%} {r['guided_util']:11.1%} {r['fixed_crossbars']:>9d} "
            f"{r['guided_crossbars']:>12d} {r['guided_cost'] / r['fixed_cost']:10.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"pressure": args.pressure, "rows": rows}, indent=2))
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['model']}\n{r['material']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["fixed_util"] for r in rows], 0.4, label="fixed 256x256")
    ax.bar([x + 0.2 for x in xs], [r["guided_util"] for r in rows], 0.4, label="memory-guided")
    ax.set_xticks(list(xs), labels, fontsize=6)
    ax.set_ylabel("crossbar utilisation")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    png = args.out.with_suffix(".png")
    fig.savefig(png, dpi=120)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
