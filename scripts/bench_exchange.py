"""Memory-aware exchange vs DDP all-reduce with and without a straggler (4 gloo ranks).

Every rank trains the same small task (a 32-64-10 MLP on a synthetic teacher-labelled
classification problem, its own data shard) under ``DistributedDataParallel``; one extra
zero-gradient parameter pads the gradient to ResNet-18's size (11,689,512 floats,
46.8 MB), so the communication is that of a ResNet-18. Compute is simulated by sleeping
``--compute-ms`` per step (4 ranks share 2 CPU cores here: real compute would measure
core contention, not the exchange); it is short (200 ms) so that a 50 ms link delay is
not lost in the noise. Scenarios, all in one run:

* ``homogeneous``: every rank alike;
* ``slow_compute``: the last rank sleeps 3x (its compute plus an injected 2x delay);
* ``slow_link``: the last rank adds ``--link-delay-ms`` (50 ms) before every transfer it
  starts (all-reduce: before each bucket's collective; memory-aware: before each
  ``isend``, pongs included, and before each subgroup all-reduce).

Methods: ``allreduce`` = DDP with its all-reduce hook (``default_hooks.allreduce_hook``,
what DDP does without a hook); ``memory_aware`` = the same DDP model with
``memory_aware_hook``, k = all (every member averages with every other: one subgroup
all-reduce over the members of the view); ``memory_aware_k2`` = the same with k = 2 of the
3 peers (point-to-point, each rank's own top-2 by Eq. 7). Deadline per exchange, refresh
every ``--refresh-every`` steps. Reported per scenario and method: the median step time
of the fast ranks and of the straggler over the steps after ``--warmup-steps`` (the same
window for every method; the first two refreshes learn the straggler's speed), the mean
over all steps, the ratio to the method's homogeneous step time, bytes written per step
per rank (``/proc`` write_chars of the process: what gloo put on its sockets, measured),
the final loss on a common evaluation set (fast ranks' mean, and the straggler's), the
memory-aware timeouts, the fraction of views that included the straggler, and how often
the others selected it (k = 2: of the 3 peers each rank picks 2, so an indifferent choice
selects each peer 2/3 of the time). Writes ``results/bench_exchange.{json,png}``.

    python scripts/bench_exchange.py            # ~6 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_utils import cpu_model, git_revision

from sedma_torch.distributed import ExchangeConfig, register_memory_aware_hook, spawn

RESNET18_PARAMS = 11_689_512
SCENARIOS = ("homogeneous", "slow_compute", "slow_link")
METHODS = ("allreduce", "memory_aware", "memory_aware_k2")


class PaddedMLP(nn.Module):
    """The small task's MLP plus a zero-gradient pad to ``total_params`` parameters."""

    def __init__(self, total_params: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
        used = sum(p.numel() for p in self.net.parameters())
        self.pad = nn.Parameter(torch.zeros(max(total_params - used, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + 0.0 * self.pad[:1]


def task_data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic classification: labels from a fixed random teacher MLP."""
    teacher_gen = torch.Generator().manual_seed(1234)
    w1 = torch.randn(32, 48, generator=teacher_gen)
    w2 = torch.randn(48, 10, generator=teacher_gen)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    return x, (torch.tanh(x @ w1) @ w2).argmax(1)


def _delayed(fn, delay_s: float):
    def delayed(*args, **kwargs):
        time.sleep(delay_s)
        return fn(*args, **kwargs)

    return delayed


def run_config(rank: int, world: int, scenario: str, method: str, args: dict) -> dict:
    straggler = world - 1
    torch.manual_seed(0)
    model = PaddedMLP(args["params"])
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    exchange = None
    restore = None
    link_delay = args["link_delay_ms"] / 1e3 if scenario == "slow_link" and rank == straggler else 0
    if method == "allreduce":
        if link_delay:

            def hook(state, bucket):
                time.sleep(link_delay)
                return default_hooks.allreduce_hook(state, bucket)

            hook.__annotations__ = default_hooks.allreduce_hook.__annotations__
            ddp.register_comm_hook(None, hook)
        else:
            ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    else:
        exchange = register_memory_aware_hook(
            ddp,
            ExchangeConfig(
                k=args["k"] if method == "memory_aware_k2" else None,
                deadline_s=args["deadline_ms"] / 1e3,
                refresh_every=args["refresh_every"],
                refresh_deadline_s=args["refresh_deadline_s"],
                readmit_wait_s=args["readmit_wait_s"],
            ),
        )
        if link_delay:
            restore = dist.isend
            dist.isend = _delayed(dist.isend, link_delay)
            # the subgroup all-reduce of the k = all transport, delayed the same way
            exchange._collective_exchange = _delayed(exchange._collective_exchange, link_delay)
    opt = torch.optim.SGD(model.net.parameters(), lr=args["lr"])
    x_all, y_all = task_data(100 + rank, args["steps"] * args["batch"])
    compute_s = args["compute_ms"] / 1e3
    if scenario == "slow_compute" and rank == straggler:
        compute_s *= 3  # its compute plus an injected delay of 2x its compute
    loss_fn = nn.CrossEntropyLoss()
    io = psutil.Process().io_counters
    times = []
    written0 = io().write_chars
    steps = range(args["steps"])
    for step in tqdm(steps, desc=f"{scenario}/{method}", disable=rank != 0, leave=False):
        start = time.perf_counter()
        sl = slice(step * args["batch"], (step + 1) * args["batch"])
        opt.zero_grad()
        loss = loss_fn(ddp(x_all[sl]), y_all[sl])
        time.sleep(compute_s)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    written = (io().write_chars - written0) / args["steps"]
    if restore is not None:
        dist.isend = restore
    timeouts = excluded = 0
    views: list[list[int]] = []
    selected, possible = [0] * world, [0] * world
    if exchange is not None:
        exchange.finish()
        timeouts = exchange.stats.timeouts
        excluded = exchange.stats.excluded_epochs
        views = exchange.views
        for schedule in exchange.schedules:  # how often each rank was picked by a member
            for i, peers in schedule.items():
                for r in schedule:
                    if r != i:
                        possible[r] += 1
                        selected[r] += r in peers
    x_eval, y_eval = task_data(999, 2048)
    with torch.no_grad():
        eval_loss = float(loss_fn(model(x_eval), y_eval))
    return {
        "rank": rank,
        "scenario": scenario,
        "method": method,
        "steady_step_ms": 1e3 * statistics.median(times[args["warmup_steps"] :]),
        "all_step_ms": 1e3 * statistics.mean(times),
        "bytes_per_step": written,
        "eval_loss": eval_loss,
        "timeouts": timeouts,
        "excluded_epochs": excluded,
        "views": views,
        "selected_by_others": selected,
        "selectable_by_others": possible,
    }


def worker(rank: int, world: int, args: dict, out: str) -> None:
    rows = []
    for scenario in SCENARIOS:
        for method in METHODS:
            dist.barrier()
            rows.append(run_config(rank, world, scenario, method, args))
    gathered: list = [None] * world
    dist.barrier()
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        Path(out).write_text(json.dumps([r for rs in gathered for r in rs], indent=1))
    dist.destroy_process_group()


def summarise(rows: list[dict], world: int) -> list[dict]:
    straggler = world - 1
    table = []
    for scenario in SCENARIOS:
        for method in METHODS:
            sel = [r for r in rows if r["scenario"] == scenario and r["method"] == method]
            fast = [r for r in sel if r["rank"] != straggler]
            slow = next(r for r in sel if r["rank"] == straggler)
            views = slow["views"]
            picked, possible = slow["selected_by_others"], slow["selectable_by_others"]
            others = [r for r in range(world) if r != straggler]
            table.append(
                {
                    "scenario": scenario,
                    "method": method,
                    "fast_step_ms": statistics.mean(r["steady_step_ms"] for r in fast),
                    "straggler_step_ms": slow["steady_step_ms"],
                    "fast_mean_all_steps_ms": statistics.mean(r["all_step_ms"] for r in fast),
                    "bytes_per_step_MB": statistics.mean(r["bytes_per_step"] for r in sel) / 1e6,
                    "eval_loss_fast": statistics.mean(r["eval_loss"] for r in fast),
                    "eval_loss_straggler": slow["eval_loss"],
                    "timeouts": sum(r["timeouts"] for r in sel),
                    "straggler_excluded_epochs": slow["excluded_epochs"],
                    "straggler_in_views": sum(straggler in v for v in views),
                    "views": len(views),
                    # fraction of (view, member) pairs in which the member picked the rank
                    "straggler_selected": picked[straggler] / possible[straggler]
                    if possible[straggler]
                    else None,
                    "others_selected": sum(picked[r] for r in others)
                    / sum(possible[r] for r in others)
                    if any(possible[r] for r in others)
                    else None,
                }
            )
    for row in table:
        base = next(
            t for t in table if t["scenario"] == "homogeneous" and t["method"] == row["method"]
        )
        row["ratio_vs_homogeneous"] = row["fast_step_ms"] / base["fast_step_ms"]
    return table


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--params", type=int, default=RESNET18_PARAMS)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--compute-ms", type=float, default=200.0)
    parser.add_argument("--link-delay-ms", type=float, default=50.0)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--deadline-ms", type=float, default=5000.0)
    parser.add_argument("--refresh-every", type=int, default=5)
    parser.add_argument("--refresh-deadline-s", type=float, default=0.25)
    parser.add_argument("--readmit-wait-s", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path("results"))
    a = parser.parse_args()
    args = {k: v for k, v in vars(a).items() if k != "out"}
    a.out.mkdir(parents=True, exist_ok=True)
    raw = a.out / "bench_exchange_raw.json"
    start = time.perf_counter()
    codes = spawn(worker, a.world, (args, str(raw)), timeout_s=3000, pg_timeout_s=600)
    if codes != [0] * a.world:
        raise SystemExit(f"workers failed: exit codes {codes}")
    table = summarise(json.loads(raw.read_text()), a.world)
    print(
        f"# bench_exchange  {cpu_model()}  rev {git_revision()}  {time.perf_counter() - start:.0f} s"
    )
    print(f"# {a.world} ranks gloo, gradient {a.params} floats, args {args}")
    print(
        f"{'scenario':13s} {'method':16s} {'fast ms':>8s} {'strag ms':>9s} {'all ms':>7s} "
        f"{'x homog':>8s} {'MB/step':>8s} {'loss fast':>9s} {'loss strag':>10s} "
        f"{'timeouts':>8s} {'in view':>8s} {'strag sel':>9s} {'other sel':>9s}"
    )
    for r in table:
        print(
            f"{r['scenario']:13s} {r['method']:16s} {r['fast_step_ms']:8.1f} "
            f"{r['straggler_step_ms']:9.1f} {r['fast_mean_all_steps_ms']:7.1f} "
            f"{r['ratio_vs_homogeneous']:8.2f} {r['bytes_per_step_MB']:8.1f} "
            f"{r['eval_loss_fast']:9.4f} {r['eval_loss_straggler']:10.4f} {r['timeouts']:8d} "
            f"{r['straggler_in_views']:>4d}/{r['views']:<3d} "
            f"{_fraction(r['straggler_selected']):>9s} {_fraction(r['others_selected']):>9s}"
        )
    (a.out / "bench_exchange.json").write_text(json.dumps({"args": args, "table": table}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.27
    for i, method in enumerate(METHODS):
        values = [
            next(r["fast_step_ms"] for r in table if r["scenario"] == s and r["method"] == method)
            for s in SCENARIOS
        ]
        ax.bar([j + i * width for j in range(len(SCENARIOS))], values, width, label=method)
    ax.set_xticks([j + width for j in range(len(SCENARIOS))], SCENARIOS)
    ax.set_ylabel("fast ranks' step time (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out / "bench_exchange.png", dpi=120)


if __name__ == "__main__":
    main()
