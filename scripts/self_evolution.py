"""Self-evolution shown, not claimed: two runs sharing one long-term memory, plus ablations.

Run from the repository root::

    python scripts/self_evolution.py                 # table + results/self_evolution.json
    python scripts/self_evolution.py --material epiram --calls 60
    python scripts/self_evolution.py --drift         # drifting workload: results/self_evolution_drift.json
    python scripts/self_evolution.py --drift --quick # the same on smaller layers (a test runs it)

Every run is a separate Python process (``--worker``) that converts the same model
(seeded) to RRAM and calibrates it until every layer's adaptive lambda has converged
(or ``--calls`` forward passes):

1. plan the partition (``st.rram.plan_partition``: memory-guided, Eq. 4),
2. ``convert_`` with that partition, programming the crossbars,
3. forward calibration batches until all layers report ``lambda_converged``.

Runs, in this order, on one SQLite LTM file that starts empty:

* ``run 1``: full system (LTM + STM) on the empty store;
* ``run 2``: full system starting from run 1's records (lambda and partitions);
* ``no LTM``: like run 2 but without long-term memory;
* ``no STM``: like run 2 but lambda from the latest calibration only (no windows);
* ``fixed 1e-12``: MELISO+'s fixed lambda (no calibration at all).

Reported per run: calibration steps (sum over layers), forward calls until converged, wall
time to the converged lambda and partition (total, and its parts: planning, programming
the crossbars, calibrating), partition candidates evaluated and memory
hits, the mean relative output error of the RRAM layers against their exact products on
held-out inputs, and crossbar utilisation. The model: four linear layers of a signal
decoder, two whose outputs are smooth along the output index (low-frequency rows) and
two generic ones (i.i.d. Gaussian rows), so both regimes of lambda appear.

Drift (``--drift``)
-------------------
Five consecutive runs (separate processes) share one SQLite LTM on a workload that drifts
(``DRIFT``): runs 1-2 on material A with layer shapes S1, run 3 switches to material B,
run 4 also changes the layer shapes (S2), run 5 is back on A with S1. Each run calibrates
until every layer's adaptive lambda has converged (the acceptance rule, printed with the
table, is the one of ``_LambdaController._calibrate``). Reported per run: calibration steps
(sum over layers), layers that found a lambda in the LTM, the relative L2 error on held-out
inputs of the final lam_t and of the converged lambda (the grid lambda with the lowest
held-out error: what an exhaustive search converges to), their ratio, and the digital
reference products the calibrations cost (``rram_stats.reference_products``).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchmark_utils import cpu_model, git_revision
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNS = ("run 1", "run 2", "no LTM", "no STM", "fixed 1e-12")
PRESSURE = 0.5  # memory pressure given to the planner, fixed so runs are comparable
SHAPES = {
    "S1": [(256, 384), (384, 256), (256, 192), (192, 128)],
    "S2": [(256, 640), (640, 96), (96, 320), (320, 48)],
}
QUICK_SHAPES = {
    "S1": [(64, 96), (96, 64), (64, 48), (48, 32)],
    "S2": [(64, 160), (160, 24), (24, 80), (80, 12)],
}
DEFAULT_OUT = REPO_ROOT / "results" / "self_evolution.json"
DRIFT = (  # (run, material, shapes): A = --material, B = --drift-material
    ("run 1", "A", "S1"),
    ("run 2", "A", "S1"),
    ("run 3", "B", "S1"),
    ("run 4", "B", "S2"),
    ("run 5", "A", "S1"),
)


def build_model(seed: int = 0, dims: list[tuple[int, int]] | None = None) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    dims = dims or SHAPES["S1"]
    layers = []
    for i, (fin, fout) in enumerate(dims):
        lin = nn.Linear(fin, fout, bias=False)
        with torch.no_grad():
            if i % 2 == 0:  # smooth along the output index
                t = torch.linspace(0, 1, fout).unsqueeze(1)
                freqs = torch.arange(1, 5, dtype=torch.float32)
                basis = torch.cos(math.pi * t * freqs)
                lin.weight.copy_(basis @ torch.randn(4, fin, generator=gen) / math.sqrt(4 * fin))
            else:
                lin.weight.copy_(torch.randn(fout, fin, generator=gen) / math.sqrt(fin))
        layers.append(lin)
    return nn.Sequential(*layers)


def worker(args: argparse.Namespace) -> dict:
    import sedma_torch as st
    from sedma_torch.memory import LongTermMemory, ShortTermMemory
    from sedma_torch.rram.partition import plan_partition

    torch.set_num_threads(1)
    mode = args.worker
    denoise = "fixed" if mode == "fixed 1e-12" else "adaptive"
    cfg = st.RRAMConfig(
        material=args.material,
        denoise=denoise,
        lambda_fixed=1e-12,
        calibration_interval=1,
        calibration_rows=32,
        seed=args.seed,
    )
    ltm = LongTermMemory(args.db) if mode in ("run 1", "run 2", "no STM") else None
    short_term = False if mode == "no STM" else ShortTermMemory()
    model = build_model(args.seed)
    start = time.perf_counter()
    plan = plan_partition(model, cfg, memory=ltm, memory_pressure=PRESSURE)
    planned = time.perf_counter()
    st.convert_(model, cfg, partition=plan, memory=ltm, short_term=short_term, progress=False)
    programmed = time.perf_counter()
    rram = [m for m in model if isinstance(m, st.RRAMLinear)]
    gen = torch.Generator().manual_seed(1000 + args.seed)
    calls = 0
    with torch.no_grad():
        while denoise == "adaptive" and calls < args.calls:
            model(torch.randn(32, 256, generator=gen))
            calls += 1
            if all(layer.lambda_converged for layer in rram):
                break
    converged_s = time.perf_counter() - start
    calibrate_s = time.perf_counter() - programmed
    converged = denoise == "fixed" or all(layer.lambda_converged for layer in rram)
    # held-out error of each RRAM layer against its exact product
    errors = []
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(2000 + args.seed))
    with torch.no_grad():
        for layer in rram:
            exact = layer.digital_twin()(x)
            y = layer(x)
            errors.append(float((y - exact).norm() / exact.norm()))
            x = exact
    if ltm is not None:
        ltm.close()
    return {
        "run": mode,
        "calibration_steps": sum(layer.calibration_steps for layer in rram),
        "calls": calls,
        "converged": converged,
        "seconds": converged_s,
        "plan_s": planned - start,
        "program_s": programmed - planned,
        "calibrate_s": calibrate_s,
        "candidates": plan.candidates_evaluated,
        "memory_hits": plan.memory_hits,
        "lambdas": [layer.last_lambda for layer in rram],
        "errors": errors,
        "mean_error": sum(errors) / len(errors),
        "utilisation": plan.utilisation,
    }


def acceptance_rule(calibration_interval: int, calibration_rows: int) -> str:
    """The convergence rule of ``_LambdaController._calibrate`` with its constants."""
    from sedma_torch.memory.long_term import LAMBDA_WINDOW
    from sedma_torch.rram import lambda_control as lc

    return (
        f"acceptance rule (sedma_torch.rram.lambda_control): a layer calibrates every "
        f"{calibration_interval} call(s) on {calibration_rows} rows against exact digital "
        f"products and is converged when\n"
        f"  (a) memory: at its first calibration a lambda_memory exists for (material, "
        f"workload type) and the error of lam_t is within LAMBDA_MEMORY_TOLERANCE = "
        f"{lc.LAMBDA_MEMORY_TOLERANCE:g} of the best grid error -> 1 step; else\n"
        f"  (b) stable: each of the last LAMBDA_STABLE_CALIBRATIONS = "
        f"{lc.LAMBDA_STABLE_CALIBRATIONS} lam_recent values has a windowed error within "
        f"LAMBDA_STABLE_TOLERANCE = {lc.LAMBDA_STABLE_TOLERANCE:g} of the lowest windowed "
        f"error -> >= {lc.LAMBDA_STABLE_CALIBRATIONS} steps.\n"
        f"  lam_t = exp(alpha log lam_memory + (1 - alpha) log lam_recent) (0 counted as "
        f"{lc.LAMBDA_LOG_FLOOR:g}); lam_memory = LongTermMemory.best_lambda: lowest mean "
        f"error over the last {LAMBDA_WINDOW} observations of the (material, workload) record.\n"
        f"  A run stops once every layer is converged; steps = its calibrations until then."
    )


def _held_out(layer, x: torch.Tensor) -> dict:
    """Relative L2 errors on ``x`` of the layer's final lam_t and of the grid lambda with
    the lowest error (the converged lambda), from one undenoised read of ``x``."""
    from sedma_torch.rram.correction import lambda_errors

    captured = {}

    def capture(p, reference):  # one read with the denoising step skipped
        captured["p"] = p.detach().clone()

    exact = layer.digital_twin()(x)
    lam_t = layer.last_lambda
    layer._lambda = capture  # instance attribute: shadows the method for this call
    try:
        layer(x)
    finally:
        del layer._lambda
    power = float((exact.double() ** 2).mean())
    grid, mse = lambda_errors(captured["p"], exact)
    best = int(mse.argmin())
    mse_t = float(lambda_errors(captured["p"], exact, [lam_t])[1][0])
    return {
        "lambda": lam_t,
        "converged_lambda": float(grid[best]),
        "error": math.sqrt(mse_t / power),
        "converged_error": math.sqrt(float(mse[best]) / power),
        "exact": exact,
    }


def drift_worker(args: argparse.Namespace) -> dict:
    import sedma_torch as st
    from sedma_torch.memory import LongTermMemory, ShortTermMemory

    torch.set_num_threads(1)
    run, which, shape = next(d for d in DRIFT if d[0] == args.drift_worker)
    material = args.material if which == "A" else args.drift_material
    dims = (QUICK_SHAPES if args.quick else SHAPES)[shape]
    rows = 16 if args.quick else 32
    cfg = st.RRAMConfig(
        material=material,
        denoise="adaptive",
        calibration_interval=1,
        calibration_rows=rows,
        seed=args.seed,
    )
    model = build_model(args.seed + (1 if shape == "S2" else 0), dims)
    ltm = LongTermMemory(args.db)
    st.convert_(model, cfg, memory=ltm, short_term=ShortTermMemory(), progress=False)
    rram = [m for m in model if isinstance(m, st.RRAMLinear)]
    gen = torch.Generator().manual_seed(1000 + 17 * DRIFT.index((run, which, shape)))
    calls = 0
    start = time.perf_counter()
    with torch.no_grad():
        while calls < args.calls and not all(layer.lambda_converged for layer in rram):
            model(torch.randn(rows, dims[0][0], generator=gen))
            calls += 1
    seconds = time.perf_counter() - start
    layers = []
    x = torch.randn(256, dims[0][0], generator=torch.Generator().manual_seed(2000 + args.seed))
    with torch.no_grad():
        for layer in rram:
            row = {
                "workload": layer.workload_type,
                "steps": layer.calibration_steps,
                "converged": layer.lambda_converged,
                "memory_hit": layer.lambda_memory is not None,
                "reference_products": layer.rram_stats.reference_products,
            }
            held = _held_out(layer, x)
            x = held.pop("exact")
            layers.append(row | held)
    ltm.close()
    errs = [r["error"] / max(r["converged_error"], 1e-300) for r in layers]
    return {
        "run": run,
        "material": material,
        "shapes": shape,
        "dims": dims,
        "calls": calls,
        "seconds": seconds,
        "calibration_steps": sum(r["steps"] for r in layers),
        "converged": all(r["converged"] for r in layers),
        "memory_hits": sum(r["memory_hit"] for r in layers),
        "reference_products": sum(r["reference_products"] for r in layers),
        "calibration_rows": rows,
        "mean_error": sum(r["error"] for r in layers) / len(layers),
        "mean_converged_error": sum(r["converged_error"] for r in layers) / len(layers),
        "max_error_ratio": max(errs),
        "layers": layers,
    }


def run_worker(
    flag: str, run: str, db: Path, args: argparse.Namespace, extra: list[str] | None = None
) -> dict:
    """Run one ``flag`` (``--worker`` / ``--drift-worker``) process for ``run`` on the LTM
    file ``db``; returns the JSON record it prints last."""
    cmd = [sys.executable, __file__, flag, run, "--db", str(db), "--material", args.material]
    cmd += ["--calls", str(args.calls), "--seed", str(args.seed), *(extra or [])]
    print(f"... {run}", flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def drift_main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "sedma_memory.db"
        results = []
        for run, _, _ in DRIFT:
            extra = ["--drift-material", args.drift_material, *(["--quick"] if args.quick else [])]
            results.append(run_worker("--drift-worker", run, db, args, extra))

    print(
        f"machine: {cpu_model()}  revision: {git_revision()}  A = {args.material}, "
        f"B = {args.drift_material}{'  (quick)' if args.quick else ''}"
    )
    head = (
        f"{'run':6s} {'material':10s} {'shapes':6s} {'calib steps':>11s} {'per layer':>10s} "
        f"{'calls':>5s} {'converged':>9s} {'LTM hits':>8s} {'err lam_t':>9s} "
        f"{'err conv':>9s} {'max ratio':>9s} {'ref products':>12s}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        per_layer = "/".join(str(layer["steps"]) for layer in r["layers"])
        print(
            f"{r['run']:6s} {r['material']:10s} {r['shapes']:6s} {r['calibration_steps']:>11d} "
            f"{per_layer:>10s} {r['calls']:>5d} {r['converged']!s:>9s} {r['memory_hits']:>8d} "
            f"{r['mean_error']:9.4f} {r['mean_converged_error']:9.4f} "
            f"{r['max_error_ratio']:9.4f} {r['reference_products']:>12d}"
        )
    print(
        "err lam_t / err conv: mean held-out relative L2 error over the layers of the final "
        "lam_t / of the converged lambda (best grid lambda on the held-out inputs); max ratio: "
        "the largest per-layer err lam_t / err conv."
    )
    print(acceptance_rule(1, results[0]["calibration_rows"]))
    out = args.out
    if out == DEFAULT_OUT:
        out = out.with_name("self_evolution_drift" + ("_quick" if args.quick else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rule = acceptance_rule(1, results[0]["calibration_rows"])
    out.write_text(json.dumps({"acceptance_rule": rule, "runs": results}, indent=2))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--material", default="taox_hfox")
    ap.add_argument("--calls", type=int, default=60, help="most calibration forward passes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--db", type=Path, default=None, help="LTM file (default: a fresh temp file)")
    ap.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument(
        "--drift", action="store_true", help="five runs on a drifting workload (see the docstring)"
    )
    ap.add_argument("--drift-material", default="alox_hfo2", help="material B of --drift")
    ap.add_argument("--quick", action="store_true", help="--drift on small layers (for tests)")
    ap.add_argument("--drift-worker", choices=[d[0] for d in DRIFT], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.drift_worker:
        print(json.dumps(drift_worker(args)))
        return
    if args.drift:
        drift_main(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "sedma_memory.db"
        results = []
        for run in RUNS:
            results.append(run_worker("--worker", run, db, args))

    print(f"machine: {cpu_model()}  revision: {git_revision()}  material: {args.material}")
    head = (
        f"{'run':12s} {'calib steps':>11s} {'calls':>5s} {'converged':>9s} {'total s':>7s} "
        f"{'plan s':>6s} {'prog s':>6s} {'calib s':>7s} {'candidates':>10s} {'mem hits':>8s} "
        f"{'rel error':>9s} {'util':>6s}  lambdas"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        lams = " ".join(f"{lam:.3g}" for lam in r["lambdas"])
        print(
            f"{r['run']:12s} {r['calibration_steps']:>11d} {r['calls']:>5d} "
            f"{r['converged']!s:>9s} {r['seconds']:7.2f} {r['plan_s']:6.2f} {r['program_s']:6.2f} "
            f"{r['calibrate_s']:7.2f} {r['candidates']:>10d} "
            f"{r['memory_hits']:>8d} {r['mean_error']:9.4f} {r['utilisation']:6.1%}  {lams}"
        )
    by_run = {r["run"]: r for r in results}
    adaptive, fixed = by_run["run 2"], by_run["fixed 1e-12"]
    print("\nper layer (held-out relative error; layers 0 and 2 have smooth outputs):")
    print(f"{'layer':>5s} {'lambda':>9s} {'adaptive':>9s} {'fixed 1e-12':>11s} {'ratio':>6s}")
    for i, (lam, ea, ef) in enumerate(
        zip(adaptive["lambdas"], adaptive["errors"], fixed["errors"], strict=True)
    ):
        print(f"{i:>5d} {lam:9.3g} {ea:9.4f} {ef:11.4f} {ea / ef:6.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
