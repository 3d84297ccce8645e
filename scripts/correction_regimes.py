"""Where first-order correction helps and where it hurts: relative error of one crossbar
product with and without MELISO+'s first-order correction as read noise grows.

Run from the repository root::

    python scripts/correction_regimes.py            # 4 materials x 2 matrices x 7 sigmas, 5 seeds
    python scripts/correction_regimes.py --quick    # 2 seeds, 4 sigmas (the test runs this)

For each material, the material's read-noise magnitude ``read_noise`` (sigma, a fraction;
state-dependent model of the material: sigma = read_noise * G) is swept from 0 to 2 %,
everything else as the material and ``RRAMConfig()`` define it (write-and-verify 20, 8-bit
DAC and ADC; ``--dac-bits 16 --no-adc`` for MELISO+'s converters). Two matrices: bcsstk02
(MELISO+'s test matrix, ``--matrix``) and the 2-D Poisson operator on a 12 x 12 grid (144 x
144, 5-point stencil, 96.8 % zeros). Error: median over seeds of ||y - A x|| / ||A x||
(and L-inf) for a standard normal x. First-order correction costs three reads, so
it adds read noise while it removes the programming error to first order; the
crossover is the sigma where the corrected error reaches the uncorrected one (linear
interpolation on the grid; "none" if it stays below). Prints a table, writes
``results/correction_regimes[_quick].json`` and a plot with the crossovers marked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import scipy.io
import scipy.sparse
import torch
from benchmark_utils import git_revision
from tqdm import tqdm

import sedma_torch as st

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MATRIX = REPO_ROOT.parent / "shared" / "data" / "bcsstk02.mtx"
MATERIALS = ("epiram", "ag_asi", "alox_hfo2", "taox_hfox")
SIGMAS = (0.0, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02)
QUICK_SIGMAS = (0.0, 0.005, 0.01, 0.02)


def poisson_2d(n: int) -> np.ndarray:
    """The 5-point Laplacian on an n x n grid (Dirichlet): n^2 x n^2, dense."""
    one = scipy.sparse.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(n, n))
    eye = scipy.sparse.identity(n)
    return (scipy.sparse.kron(eye, one) + scipy.sparse.kron(one, eye)).toarray()


def load_matrices(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise SystemExit(
            f"correction_regimes: matrix file not found: {path}\n"
            "Pass --matrix PATH to a MatrixMarket file (default: <repo>/../shared/data/bcsstk02.mtx)."
        )
    m = scipy.io.mmread(path)
    dense = m.toarray() if hasattr(m, "toarray") else np.asarray(m)
    return {path.stem: np.asarray(dense, dtype=np.float64), "poisson2d_12": poisson_2d(12)}


def errors(a: np.ndarray, cfg: st.RRAMConfig, seeds: int) -> tuple[float, float]:
    l2, linf = [], []
    for seed in range(seeds):
        x = np.random.default_rng(seed).standard_normal(a.shape[1])
        stats = st.rram.mvm(a, x, cfg.replace(seed=seed), compare=True).stats
        l2.append(stats["rel_l2"])
        linf.append(stats["rel_linf"])
    return float(np.median(l2)), float(np.median(linf))


def crossover(sigmas, none, corrected) -> float | None:
    """First sigma where corrected >= none (linear interpolation), None if never."""
    diff = np.asarray(corrected) - np.asarray(none)
    for i in range(len(sigmas)):
        if diff[i] >= 0:
            if i == 0:
                return float(sigmas[0])
            s0, s1, d0, d1 = sigmas[i - 1], sigmas[i], diff[i - 1], diff[i]
            return float(s0 + (s1 - s0) * (-d0) / (d1 - d0))
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--matrix", type=Path, default=DEFAULT_MATRIX)
    parser.add_argument("--seeds", type=int, default=None, help="seeds per point (default 5)")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 4 sigmas")
    parser.add_argument("--dac-bits", type=int, default=8)
    parser.add_argument("--no-adc", action="store_true")
    parser.add_argument(
        "--read-noise-model",
        default=None,
        choices=("independent", "proportional", "shot"),
        help="read-noise model (default: each material's own, proportional)",
    )
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = args.seeds or (2 if args.quick else 5)
    sigmas = QUICK_SIGMAS if args.quick else SIGMAS
    matrices = load_matrices(args.matrix)
    base = st.RRAMConfig(
        dac_bits=args.dac_bits,
        adc_bits=None if args.no_adc else 8,
        read_noise_model=args.read_noise_model,
    )
    print(
        f"sedma_torch {git_revision()}; dac {args.dac_bits} bit, adc {base.adc_bits}; {seeds} seeds"
    )
    results = []
    total = len(matrices) * len(MATERIALS) * len(sigmas) * 2
    with tqdm(total=total, desc="regimes", unit="point") as bar:
        for mname, a in matrices.items():
            for material in MATERIALS:
                nominal = st.rram.get_material(material)
                row = {
                    "matrix": mname,
                    "material": material,
                    "model": args.read_noise_model or nominal.read_noise_model,
                }
                for mode in ("none", "first_order"):
                    l2s, linfs = [], []
                    for sigma in sigmas:
                        mat = dataclasses.replace(
                            nominal, name=f"{material}_sigma{sigma:g}", read_noise=sigma
                        )
                        cfg = base.replace(material=mat, correction=mode, read_noise=sigma > 0)
                        l2, linf = errors(a, cfg, seeds)
                        l2s.append(l2)
                        linfs.append(linf)
                        bar.update()
                    row[mode] = {"rel_l2": l2s, "rel_linf": linfs}
                row["crossover_sigma"] = crossover(
                    sigmas, row["none"]["rel_l2"], row["first_order"]["rel_l2"]
                )
                row["nominal_sigma"] = nominal.read_noise
                results.append(row)

    head = "matrix          material   " + " ".join(f"s={100 * s:g}%".ljust(12) for s in sigmas)
    print(head + "  crossover")
    for row in results:
        cells = " ".join(
            f"{n:.2g}>{c:.2g}".ljust(12)
            for n, c in zip(row["none"]["rel_l2"], row["first_order"]["rel_l2"], strict=True)
        )
        cross = row["crossover_sigma"]
        text = "none (helps throughout)" if cross is None else f"{100 * cross:.2f} %"
        print(f"{row['matrix']:<15} {row['material']:<10} {cells}  {text}")
    print("cells: rel L2 without > with first-order correction; crossover: read-noise sigma")
    print(
        "from which correction stops helping. Material defaults: "
        + ", ".join(f"{m} {100 * st.rram.get_material(m).read_noise:g} %" for m in MATERIALS)
    )

    args.output_dir.mkdir(parents=True, exist_ok=True)
    name = "correction_regimes" + (f"_{args.read_noise_model}" if args.read_noise_model else "")
    name += "_quick" if args.quick else ""
    meta = {"git": git_revision(), "seeds": seeds, "sigmas": list(sigmas), "config": base.to_dict()}
    (args.output_dir / f"{name}.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2)
    )
    fig, axes = plt.subplots(len(matrices), len(MATERIALS), figsize=(16, 7), sharex=True)
    for i, mname in enumerate(matrices):
        for j, material in enumerate(MATERIALS):
            ax = axes[i, j]
            row = next(r for r in results if r["matrix"] == mname and r["material"] == material)
            pct = 100 * np.asarray(sigmas)
            ax.plot(pct, row["none"]["rel_l2"], "o-", label="no correction")
            ax.plot(pct, row["first_order"]["rel_l2"], "s-", label="first-order")
            if row["crossover_sigma"] is not None:
                ax.axvline(100 * row["crossover_sigma"], color="grey", ls="--", label="crossover")
            ax.axvline(100 * row["nominal_sigma"], color="red", ls=":", label="material default")
            ax.set_yscale("log")
            ax.set_title(f"{mname}: {material}", fontsize=9)
            if i == len(matrices) - 1:
                ax.set_xlabel("read noise sigma (%)")
            if j == 0:
                ax.set_ylabel("relative L2 error")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.output_dir / f"{name}.png", dpi=110)
    print(f"wrote {args.output_dir / name}.json and .png")


if __name__ == "__main__":
    main()
