"""Relative error of one simulated crossbar product A x per material, correction and
write-verify budget (the MELISO+ quick-start matrix bcsstk02 by default).

Run from the repository root::

    python scripts/mvm_table.py                              # full table (~1-2 min, 2 cores)
    python scripts/mvm_table.py --no-read-noise --no-adc     # programming and DAC error alone
    python scripts/mvm_table.py --matrix path/to/other.mtx --seeds 5

For every (material, mode, write_verify_iters) it runs ``st.rram.mvm(A, x, cfg,
compare=True)`` for ``--seeds`` seeds (seed s: ``RRAMConfig(seed=s)`` and a standard
normal x drawn with seed s) and reports the median and interquartile range of
``rel_l2 = ||y - Ax||_2 / ||Ax||_2`` and ``rel_linf = ||y - Ax||_inf / ||Ax||_inf``.
Writes ``results/mvm_table[_suffix].json`` and a PNG plot of the median rel L2.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import scipy.io
import torch
from benchmark_utils import git_revision
from tqdm import tqdm

import sedma_torch as st

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MATRIX = REPO_ROOT.parent / "shared" / "data" / "bcsstk02.mtx"
MATERIALS = ("epiram", "ag_asi", "alox_hfo2", "taox_hfox")
MODES = {
    "none": {"correction": "none", "denoise": "none"},
    "first_order": {"correction": "first_order", "denoise": "none"},
    "first_order+denoise(adaptive)": {"correction": "first_order", "denoise": "adaptive"},
}
WRITE_VERIFY_ITERS = (1, 20, 50)


def load_matrix(path: Path) -> np.ndarray:
    if not path.is_file():
        raise SystemExit(
            f"mvm_table: matrix file not found: {path}\n"
            "Pass --matrix PATH to a MatrixMarket file (default: <repo>/../shared/data/bcsstk02.mtx)."
        )
    matrix = scipy.io.mmread(path)
    dense = matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)
    return np.asarray(dense, dtype=np.float64)


def summarise(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values)
    q25, median, q75 = np.percentile(arr, [25, 50, 75])
    return {
        "median": float(median),
        "q25": float(q25),
        "q75": float(q75),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


def run(
    matrix: np.ndarray, seeds: int, read_noise: bool, adc_bits: int | None
) -> list[dict[str, object]]:
    a = torch.from_numpy(matrix)
    combos = list(itertools.product(MATERIALS, MODES, WRITE_VERIFY_ITERS))
    results = []
    with tqdm(total=len(combos) * seeds, desc="mvm", unit="mvm") as progress:
        for material, mode, iters in combos:
            rel_l2, rel_linf = [], []
            for seed in range(seeds):
                config = st.RRAMConfig(
                    material=material,
                    write_verify_iters=iters,
                    read_noise=read_noise,
                    adc_bits=adc_bits,
                    seed=seed,
                    **MODES[mode],
                )
                generator = torch.Generator().manual_seed(seed)
                x = torch.randn(a.shape[1], dtype=torch.float64, generator=generator)
                stats = st.rram.mvm(a, x, config, compare=True).stats
                rel_l2.append(stats["rel_l2"])
                rel_linf.append(stats["rel_linf"])
                progress.update()
            results.append(
                {
                    "material": material,
                    "mode": mode,
                    "write_verify_iters": iters,
                    "rel_l2": rel_l2,
                    "rel_linf": rel_linf,
                    "rel_l2_summary": summarise(rel_l2),
                    "rel_linf_summary": summarise(rel_linf),
                }
            )
    return results


def run_meliso(matrix: np.ndarray, seeds: int) -> list[dict[str, object]]:
    """Each material on its ``meliso_<material>`` preset (MELISO+'s noise sources, 21
    write-verify passes, 16-bit inputs, no read noise, no ADC), without correction and
    with MELISO+'s first-order correction (x written onto cells) and fixed lambda."""
    a = torch.from_numpy(matrix)
    results = []
    modes = {"none": {"correction": "none", "denoise": "none"}, "first_order+fixed": {}}
    with tqdm(total=len(MATERIALS) * len(modes) * seeds, desc="meliso", unit="mvm") as bar:
        for material in MATERIALS:
            for mode, changes in modes.items():
                rel_l2, rel_linf = [], []
                for seed in range(seeds):
                    config = st.preset(f"meliso_{material}", seed=seed, **changes)
                    generator = torch.Generator().manual_seed(seed)
                    x = torch.randn(a.shape[1], dtype=torch.float64, generator=generator)
                    stats = st.rram.mvm(a, x, config, compare=True).stats
                    rel_l2.append(stats["rel_l2"])
                    rel_linf.append(stats["rel_linf"])
                    bar.update()
                results.append(
                    {
                        "material": material,
                        "mode": mode,
                        "write_verify_iters": 21,
                        "rel_l2": rel_l2,
                        "rel_linf": rel_linf,
                        "rel_l2_summary": summarise(rel_l2),
                        "rel_linf_summary": summarise(rel_linf),
                    }
                )
    return results


def print_table(results: list[dict[str, object]]) -> None:
    header = (
        f"{'material':<10} {'mode':<30} {'wv':>3}  {'rel L2 median [IQR]':<30} "
        f"{'rel Linf median [IQR]':<30}"
    )
    print(header)
    print("-" * len(header))
    for row in results:
        cells = []
        for key in ("rel_l2_summary", "rel_linf_summary"):
            s = row[key]
            cells.append(f"{s['median']:.3e} [{s['q25']:.2e}, {s['q75']:.2e}]")
        print(
            f"{row['material']:<10} {row['mode']:<30} {row['write_verify_iters']:>3}  "
            f"{cells[0]:<30} {cells[1]:<30}"
        )


def plot(results: list[dict[str, object]], title: str, path: Path) -> None:
    fig, axes = plt.subplots(1, len(MODES), figsize=(5 * len(MODES), 4.5), sharey=True)
    width = 0.8 / len(WRITE_VERIFY_ITERS)
    positions = np.arange(len(MATERIALS))
    for ax, mode in zip(axes, MODES, strict=True):
        for k, iters in enumerate(WRITE_VERIFY_ITERS):
            rows = [
                next(
                    r
                    for r in results
                    if r["material"] == m and r["mode"] == mode and r["write_verify_iters"] == iters
                )
                for m in MATERIALS
            ]
            median = np.array([r["rel_l2_summary"]["median"] for r in rows])
            low = median - np.array([r["rel_l2_summary"]["q25"] for r in rows])
            high = np.array([r["rel_l2_summary"]["q75"] for r in rows]) - median
            ax.bar(
                positions + (k - (len(WRITE_VERIFY_ITERS) - 1) / 2) * width,
                median,
                width,
                yerr=[low, high],
                capsize=2,
                label=f"write-verify {iters}",
            )
        ax.set_title(mode)
        ax.set_xticks(positions, MATERIALS)
        ax.set_yscale("log")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("median relative L2 error (IQR bars)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(WRITE_VERIFY_ITERS))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--matrix", type=Path, default=DEFAULT_MATRIX, help="MatrixMarket file")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per cell of the table")
    parser.add_argument("--no-read-noise", action="store_true", help="switch read noise off")
    parser.add_argument("--no-adc", action="store_true", help="read columns at full precision")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for small matrices)"
    )
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "results")
    parser.add_argument(
        "--preset",
        choices=("meliso",),
        default=None,
        help="meliso: every material on its meliso_<material> preset, without and with "
        "first-order correction, against MELISO+'s published errors (--published)",
    )
    parser.add_argument(
        "--published",
        type=Path,
        default=None,
        help="JSON {material: {mode: rel_linf}} of MELISO+'s published relative L-inf errors "
        "(arXiv 2508.13298) to print beside the measured ones",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    matrix = load_matrix(args.matrix)
    if args.preset == "meliso":
        main_meliso(args, matrix)
        return
    read_noise = not args.no_read_noise
    adc_bits = None if args.no_adc else st.RRAMConfig().adc_bits
    setting = (
        f"{args.matrix.name} {matrix.shape[0]}x{matrix.shape[1]}, dac 8 bit, "
        f"adc {adc_bits if adc_bits else 'off'}, read noise {'on' if read_noise else 'off'}, "
        f"{args.seeds} seeds"
    )
    print(f"torch {torch.__version__}, sedma_torch {git_revision()}, {args.threads} thread(s)")
    print(setting)
    results = run(matrix, args.seeds, read_noise, adc_bits)
    print_table(results)

    suffix = ("_no-read-noise" if args.no_read_noise else "") + ("_no-adc" if args.no_adc else "")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / f"mvm_table{suffix}.json"
    png_path = args.output_dir / f"mvm_table{suffix}.png"
    meta = {
        "matrix": str(args.matrix),
        "shape": list(matrix.shape),
        "seeds": args.seeds,
        "read_noise": read_noise,
        "adc_bits": adc_bits,
        "dac_bits": st.RRAMConfig().dac_bits,
        "torch": torch.__version__,
        "git": git_revision(),
        "vector": "standard normal, torch.Generator seeded with the config seed",
    }
    json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, setting, png_path)
    print(f"wrote {json_path} and {png_path}")


def main_meliso(args: argparse.Namespace, matrix: np.ndarray) -> None:
    print(f"torch {torch.__version__}, sedma_torch {git_revision()}, {args.threads} thread(s)")
    print(
        f"{args.matrix.name} {matrix.shape[0]}x{matrix.shape[1]}, meliso presets, {args.seeds} seeds"
    )
    results = run_meliso(matrix, args.seeds)
    published = json.loads(args.published.read_text()) if args.published else {}
    header = f"{'material':<10} {'mode':<18} {'rel Linf median [IQR]':<30} {'rel L2 median':<14} {'published Linf':<14} ratio"
    print(header)
    print("-" * len(header))
    for row in results:
        s = row["rel_linf_summary"]
        pub = published.get(row["material"], {}).get(row["mode"])
        ratio = f"{s['median'] / pub:.2f}x" if pub else "-"
        print(
            f"{row['material']:<10} {row['mode']:<18} "
            f"{s['median']:.3e} [{s['q25']:.2e}, {s['q75']:.2e}]  "
            f"{row['rel_l2_summary']['median']:<14.3e} {pub if pub else 'n/a':<14} {ratio}"
        )
    if not published:
        print(
            "MELISO+'s published per-material errors (arXiv 2508.13298) are not bundled: "
            "pass --published FILE with {material: {mode: rel_linf}} to compare."
        )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "mvm_table_meliso.json"
    path.write_text(
        json.dumps(
            {
                "matrix": str(args.matrix),
                "seeds": args.seeds,
                "published": published,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
