"""Placement benchmarks (SPEC.md layer 3): solve time/optimality, adaptation, resilience.

    python scripts/bench_placement.py                      # everything, defaults below
    python scripts/bench_placement.py --sections solve --seeds 0 1 2

1. solve: exact MILP (HiGHS via scipy.optimize.milp) on random instances of 20 agents x
   10 nodes (the paper's size) and 100 x 50, against greedy first-fit and Kubernetes-style
   LeastAllocated scoring; objective = communication (ms/step) + lambda_mem * memory term.
   A MILP stopped by its time limit reports HiGHS's gap to its proven lower bound.
2. adaptation: a DeploymentHook on a simulated training loop; the throughput halves at a
   known step; measured = wall time from the first slow step to validated manifests on
   disk (includes every on_step call in between), median over runs.
3. resilience: remove the busiest node (highest CPU load) and compare the throughput
   retained (model in sedma_torch.deploy.simulate) without re-placement (Pods pinned to
   the dead node stay Pending: 0), with kube-scheduler-style LeastAllocated rescheduling
   of the orphaned agents, and with the MILP (others pinned / everything re-solved).

Prints markdown tables; --plot saves results/bench_placement.png.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sedma_torch.deploy import (
    DeploymentHook,
    InfeasiblePlacementError,
    first_fit_placement,
    least_allocated_placement,
    node_usage,
    optimize_placement,
    pipeline_throughput,
    placement_cost,
    random_instance,
    replace_after_failure,
)
from sedma_torch.deploy.placement import RESOURCES

LAMBDA = 10.0


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def bench_solve(sizes: list[tuple[int, int]], seeds: list[int], limits: dict[int, float]) -> list:
    rows = []
    for n_agents, n_nodes in sizes:
        for seed in tqdm(seeds, desc=f"solve {n_agents}x{n_nodes}"):
            workflow, cluster = random_instance(n_agents, n_nodes, seed=seed)
            out = {"size": f"{n_agents}x{n_nodes}", "seed": seed}
            try:
                milp = optimize_placement(workflow, cluster, LAMBDA, time_limit_s=limits[n_agents])
                out.update(
                    milp=milp.objective,
                    status=milp.status,
                    method=milp.method,
                    gap=milp.mip_gap,
                    bound=milp.lower_bound,
                    seconds=milp.solve_seconds,
                )
            except TimeoutError:
                out.update(milp=None, status="no incumbent", method="", gap=None, bound=None)
            for name, fn in (
                ("first_fit", first_fit_placement),
                ("least", least_allocated_placement),
            ):
                try:
                    out[name] = fn(workflow, cluster, LAMBDA).objective
                except InfeasiblePlacementError:
                    out[name] = None
            rows.append(out)
    print("\n### Solve time and optimality (objective = comm ms/step + 10 * memory term)\n")
    print(
        "| size | seed | MILP status | MILP solve s | MILP objective | lower bound | gap | "
        "first-fit | least-allocated | first-fit / MILP | least-alloc / MILP |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = lambda v, r=r: _fmt(v / r["milp"], ".2f") if v and r["milp"] else "–"  # noqa: E731
        status = r["status"] if r["status"] == "optimal" else f"{r['status']} ({r['method']})"
        print(
            f"| {r['size']} | {r['seed']} | {status} | {_fmt(r.get('seconds'))} | "
            f"{_fmt(r['milp'])} | {_fmt(r['bound'])} | {_fmt(r['gap'] and 100 * r['gap'], '.1f')} % | "
            f"{_fmt(r['first_fit'])} | {_fmt(r['least'])} | {ratio(r['first_fit'])} | "
            f"{ratio(r['least'])} |"
        )
    return rows


def bench_adaptation(runs: int, n_agents: int, n_nodes: int, time_limit_s: float) -> list[float]:
    workflow, cluster = random_instance(n_agents, n_nodes, seed=123)
    seconds, statuses, steps, gaps = [], [], [], []
    for run in tqdm(range(runs), desc=f"adaptation {n_agents}x{n_nodes}"):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = {
                "enabled": True,
                "workflow": workflow.to_dict(),
                "cluster": cluster.to_dict(),
                "window": 10,
                "warmup_steps": 10,
                "cooldown_steps": 10,
                "time_limit_s": time_limit_s,
                "out_dir": tmp,
            }
            hook = DeploymentHook.from_config(cfg, utilisation_fn=lambda: (0.3, 0.3))
            for step in range(11):
                hook.on_step(step=step, samples=64, seconds=64 / 100.0)
            start = time.perf_counter()
            event = None
            step = 11
            while event is None and step < 100:
                event = hook.on_step(step=step, samples=64, seconds=64 / 50.0)
                step += 1
            assert event is not None, f"run {run}: no trigger"
            assert all(p.is_file() for p in event.manifest_paths)
            seconds.append(time.perf_counter() - start)
            statuses.append(event.placement.status)
            gaps.append(event.placement.mip_gap or 0.0)
            steps.append(event.step - 11 + 1)
            hook.close()
    print(
        f"\n### Adaptation: drop to validated manifests, {n_agents} agents x {n_nodes} nodes, "
        f"solver time limit {time_limit_s:g} s\n"
    )
    print(
        "| runs | median s | min s | max s | steps from drop to trigger | solver status | "
        "median MIP gap |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {runs} | {statistics.median(seconds):.2f} | {min(seconds):.2f} | {max(seconds):.2f} | "
        f"{statistics.median(steps):.0f} | {', '.join(sorted(set(statuses)))} | "
        f"{100 * statistics.median(gaps):.1f} % |"
    )
    return seconds


def _least_allocated_orphans(workflow, cluster, assignment):
    """kube-scheduler LeastAllocated for the orphaned agents only (others stay)."""
    live = set(cluster.node_names)
    new = {a: n for a, n in assignment.items() if n in live}
    used = {n.name: dict.fromkeys(RESOURCES, 0.0) for n in cluster.nodes}
    for agent in workflow.agents:
        if agent.name in new:
            for r in RESOURCES:
                used[new[agent.name]][r] += getattr(agent, r)
    for agent in workflow.agents:
        if agent.name in new:
            continue
        best = None
        for node in cluster.nodes:
            after = {r: used[node.name][r] + getattr(agent, r) for r in RESOURCES}
            if any(after[r] > getattr(node, r) + 1e-9 for r in RESOURCES):
                continue
            score = np.mean([(getattr(node, r) - after[r]) / getattr(node, r) for r in RESOURCES])
            if best is None or score > best[0]:
                best = (score, node.name)
        if best is None:
            return None
        new[agent.name] = best[1]
        for r in RESOURCES:
            used[best[1]][r] += getattr(agent, r)
    return new


def bench_resilience(seeds: list[int], n_agents: int, n_nodes: int, time_limit_s: float) -> list:
    rows = []
    for seed in tqdm(seeds, desc="resilience"):
        workflow, cluster = random_instance(n_agents, n_nodes, seed=seed, fill=0.5)
        placement = optimize_placement(workflow, cluster, LAMBDA, time_limit_s=time_limit_s)
        before = pipeline_throughput(workflow, cluster, placement.assignment)
        use = node_usage(workflow, cluster, placement.assignment)
        busiest = max(use, key=lambda n: use[n]["cpu"] / use[n]["cpu_cap"])
        remaining = cluster.without_node(busiest)
        row = {"seed": seed, "busiest": busiest, "before": before}
        row["none"] = pipeline_throughput(workflow, remaining, placement.assignment) / before
        orphans = _least_allocated_orphans(workflow, remaining, placement.assignment)
        row["k8s"] = pipeline_throughput(workflow, remaining, orphans) / before if orphans else 0.0
        for key, move in (("pinned", False), ("full", True)):
            try:
                _, new = replace_after_failure(
                    workflow,
                    cluster,
                    placement,
                    busiest,
                    move_others=move,
                    time_limit_s=time_limit_s,
                )
                row[key] = pipeline_throughput(workflow, remaining, new.assignment) / before
                row[f"{key}_cost"] = sum(placement_cost(workflow, remaining, new.assignment))
            except InfeasiblePlacementError:
                row[key] = 0.0
        rows.append(row)
    print(
        f"\n### Resilience: throughput retained after removing the busiest node "
        f"({n_agents} agents x {n_nodes} nodes, 50 % fill, solver limit {time_limit_s:g} s)\n"
    )
    print(
        "| seed | removed | throughput before (samples/s) | not re-placed | "
        "k8s LeastAllocated (orphans) | MILP, others pinned | MILP, full re-solve |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seed']} | {r['busiest']} | {r['before']:.3f} | {100 * r['none']:.0f} % | "
            f"{100 * r['k8s']:.0f} % | {100 * r['pinned']:.0f} % | {100 * r['full']:.0f} % |"
        )
    means = {k: statistics.mean(r[k] for r in rows) for k in ("none", "k8s", "pinned", "full")}
    print(
        f"| mean | | | {100 * means['none']:.0f} % | {100 * means['k8s']:.0f} % | "
        f"{100 * means['pinned']:.0f} % | {100 * means['full']:.0f} % |"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["solve", "adaptation", "resilience"],
        choices=["solve", "adaptation", "resilience"],
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--sizes", nargs="+", default=["20x10", "100x50"], help="solve sizes, AGENTSxNODES"
    )
    parser.add_argument(
        "--limit-small", type=float, default=120.0, help="time limit up to 20 agents, s"
    )
    parser.add_argument(
        "--limit-large", type=float, default=120.0, help="time limit above 20 agents, s"
    )
    parser.add_argument("--large-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--adapt-runs", type=int, default=5)
    parser.add_argument("--adapt-limit", type=float, default=2.0)
    parser.add_argument("--plot", action="store_true")
    args = parser.parse_args()

    rows = []
    if "solve" in args.sections:
        for size in args.sizes:
            n_agents, n_nodes = (int(v) for v in size.split("x"))
            large = n_agents > 20
            rows += bench_solve(
                [(n_agents, n_nodes)],
                args.large_seeds if large else args.seeds,
                {n_agents: args.limit_large if large else args.limit_small},
            )
    if "adaptation" in args.sections:
        bench_adaptation(args.adapt_runs, 8, 4, args.adapt_limit)
        bench_adaptation(args.adapt_runs, 20, 10, args.adapt_limit)
    resilience = []
    if "resilience" in args.sections:
        resilience = bench_resilience(args.seeds, 20, 10, time_limit_s=30.0)
    if args.plot and (rows or resilience):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        if rows:
            labels = [f"{r['size']} s{r['seed']}" for r in rows]
            x = np.arange(len(rows))
            for k, (key, name) in enumerate(
                (("milp", "MILP"), ("first_fit", "first-fit"), ("least", "least-allocated"))
            ):
                axes[0].bar(x + 0.27 * (k - 1), [r[key] or 0 for r in rows], 0.27, label=name)
            axes[0].set_xticks(x, labels, rotation=30)
            axes[0].set_yscale("log")
            axes[0].set_ylabel("objective (ms/step + memory term)")
            axes[0].legend()
        if resilience:
            keys = ("none", "k8s", "pinned", "full")
            axes[1].bar(keys, [100 * statistics.mean(r[k] for r in resilience) for k in keys])
            axes[1].set_ylabel("throughput retained, %")
        fig.tight_layout()
        out = Path("results") / "bench_placement.png"
        out.parent.mkdir(exist_ok=True)
        fig.savefig(out, dpi=120)
        print(f"\nplot: {out}")


if __name__ == "__main__":
    main()
