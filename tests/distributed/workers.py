"""Worker functions run in spawned processes by the distributed tests (importable)."""

from __future__ import annotations

import copy
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from sedma_torch import RRAMConfig, convert_
from sedma_torch.distributed import (
    ExchangeConfig,
    MemoryAwareGroup,
    PeerExchange,
    register_memory_aware_hook,
)


def step_tensor(rank: int, step: int, n: int = 257) -> torch.Tensor:
    """The tensor rank ``rank`` contributes at ``step`` (reproducible in the parent)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, generator=g, dtype=torch.float64) * (rank + 1) + step


def all_peers_worker(rank: int, world: int, out: str) -> None:
    """Exchange, wrapper all_reduce and broadcast with every peer selected."""
    ex = PeerExchange(ExchangeConfig(k=None, deadline_s=20.0, refresh_every=100))
    ex.begin_step()
    a = step_tensor(rank, 0)
    b = step_tensor(rank, 1, n=12).float().reshape(3, 4)
    res_a = ex.exchange(a)
    res_b = ex.exchange(b)
    group = MemoryAwareGroup(ExchangeConfig(k=None, deadline_s=20.0))
    group.begin_step()
    c = step_tensor(rank, 2, n=33)
    c_in = c.clone()
    group.all_reduce(c)
    d = step_tensor(rank, 3, n=5)
    d_in = d.clone()
    ok = group.broadcast(d, src=1)
    torch.save(
        {
            "a": a,
            "b": b,
            "res_a": res_a,
            "res_b": res_b,
            "c": c_in,
            "res_c": c,
            "d": d_in,
            "res_d": d,
            "broadcast_ok": ok,
            "graph": ex.graph,
            "rtt": ex.view[rank].rtt_ms,
            "received": ex.stats.received,
        },
        Path(out) / f"peers_rank{rank}.pt",
    )
    ex.finish()
    group.finish()


class TinyNet(nn.Module):
    """A conv + two linear layers; input (batch, 1, 6, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc1 = nn.Linear(3 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(77 + 31 * rank + 1000 * step)
    return torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _reprogram(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "program_"):
            m.program_()


def ddp_rram_worker(rank: int, world: int, out: str, steps: int) -> None:
    """Digital DDP (all-reduce) vs RRAM models under DDP with the memory-aware hook."""
    torch.manual_seed(0)
    digital = TinyNet()
    ideal = convert_(
        copy.deepcopy(digital),
        RRAMConfig(material="ideal", dac_bits=None, adc_bits=None),
        progress=False,
    )
    noisy = convert_(copy.deepcopy(digital), RRAMConfig(material="taox_hfox"), progress=False)
    noisy_local = copy.deepcopy(noisy)
    noisy_buffers = copy.deepcopy(noisy)
    ddp_digital = nn.parallel.DistributedDataParallel(digital)
    ddp_ideal = nn.parallel.DistributedDataParallel(ideal, broadcast_buffers=False)
    ddp_noisy = nn.parallel.DistributedDataParallel(noisy, broadcast_buffers=False)
    # DDP's default: the RRAM state buffers are broadcast from rank 0 at every forward
    ddp_noisy_buffers = nn.parallel.DistributedDataParallel(noisy_buffers)
    cfg = ExchangeConfig(k=None, deadline_s=20.0, refresh_every=2)
    register_memory_aware_hook(ddp_ideal, cfg)
    register_memory_aware_hook(ddp_noisy, cfg)
    register_memory_aware_hook(ddp_noisy_buffers, cfg)
    # DDP's construction broadcast touched the weights; program the noisy copies now,
    # from the same state, so the local reference reads the same conductances
    for m in (noisy, noisy_local, noisy_buffers):
        _reprogram(m)
    models = {
        "digital": ddp_digital,
        "ideal": ddp_ideal,
        "noisy": ddp_noisy,
        "noisy_buffers": ddp_noisy_buffers,
    }
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}
    loss_fn = nn.CrossEntropyLoss()
    record: dict = {"losses": {k: [] for k in models}}
    for step in range(steps):
        x, y = _batch(rank, step)
        for name, model in models.items():
            opts[name].zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            record["losses"][name].append(float(loss))
            if step == 0:
                record[f"grad_{name}"] = _grads(model.module)
        if step == 0:
            loss_fn(noisy_local(x), y).backward()
            record["grad_noisy_local"] = _grads(noisy_local)
        for opt in opts.values():
            opt.step()
    record["params"] = {
        k: {n: p.detach().clone() for n, p in m.module.named_parameters()}
        for k, m in models.items()
    }
    torch.save(record, Path(out) / f"ddp_rank{rank}.pt")


def fault_worker(
    rank: int, world: int, out: str, kill_rank: int, kill_step: int, steps: int
) -> None:
    """Averaging loop in which ``kill_rank`` is SIGKILLed at ``kill_step``."""
    group = MemoryAwareGroup(
        ExchangeConfig(k=None, deadline_s=5.0, refresh_every=3, refresh_deadline_s=5.0)
    )
    results, participants = [], []
    start = time.perf_counter()
    for step in range(steps):
        group.begin_step()
        if rank == kill_rank and step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        t = step_tensor(rank, step)
        results.append(group.all_reduce(t).clone())
        participants.append(group.exchange.last_participants)
    finished = group.finish(timeout_s=5.0)
    torch.save(
        {
            "results": results,
            "participants": participants,
            "dead": sorted(group.stats.dead),
            "finished": finished,
            "elapsed_s": time.perf_counter() - start,
        },
        Path(out) / f"fault_rank{rank}.pt",
    )


def straggler_worker(
    rank: int, world: int, out: str, slow_rank: int, delay_s: float, steps: int
) -> None:
    """k=1 selection with one rank that arrives ``delay_s`` late at every exchange."""
    ex = PeerExchange(ExchangeConfig(k=1, deadline_s=0.3, refresh_every=3, refresh_deadline_s=5.0))
    rows = []
    for step in range(steps):
        ex.begin_step()
        if rank == slow_rank:
            time.sleep(delay_s)
        t = step_tensor(rank, step)
        before = ex.stats.timeouts
        res = ex.exchange(t)
        rows.append(
            {
                "step": step,
                "sources": list(ex.sources),
                "result": res,
                "timed_out": ex.stats.timeouts - before,
                "graph": dict(ex.graph),
            }
        )
    ex.finish(timeout_s=5.0)
    torch.save(
        {"rows": rows, "late": ex.stats.late_arrivals, "weights": ex.selector.weights},
        Path(out) / f"straggler_rank{rank}.pt",
    )


def ddp_worker(rank: int, world: int, out: str, ddp_steps: int) -> None:
    """Digital DDP vs RRAM models under DDP with the memory-aware hook."""
    ddp_rram_worker(rank, world, out, ddp_steps)
    dist.destroy_process_group()


def exchange_worker(rank: int, world: int, out: str, slow: dict, late: dict, kill: dict) -> None:
    """All peers healthy, then a straggler phase, then a rank late in a collective, then a
    phase in which one rank is killed."""
    all_peers_worker(rank, world, out)
    straggler_worker(rank, world, out, **slow)
    collective_deadline_worker(rank, world, out, **late)
    fault_worker(rank, world, out, **kill)
    dist.destroy_process_group()


class SmallMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def mlp_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + 17 * rank + 1000 * step)
    return torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)


def ddp_fault_worker(
    rank: int, world: int, out: str, kill_rank: int, kill_step: int, steps: int
) -> None:
    """DDP + memory-aware hook; ``kill_rank`` is SIGKILLed at ``kill_step``."""
    torch.manual_seed(0)
    model = SmallMLP()
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    exchange = register_memory_aware_hook(
        ddp, ExchangeConfig(k=None, deadline_s=5.0, refresh_every=2, refresh_deadline_s=5.0)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    participants = []
    for step in range(steps):
        if rank == kill_rank and step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = mlp_batch(rank, step)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        participants.append(exchange.last_participants)
        opt.step()
    exchange.finish(timeout_s=5.0)
    torch.save(
        {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "participants": participants,
            "dead": sorted(exchange.stats.dead),
        },
        Path(out) / f"ddpfault_rank{rank}.pt",
    )
    dist.destroy_process_group()


def readmit_worker(
    rank: int,
    world: int,
    out: str,
    slow_rank: int,
    slow_steps: list[int],
    delay_s: float,
    compute_s: float,
    steps: int,
    lr: float,
    mode: str = "ddp",
) -> None:
    """k = all; ``slow_rank`` sleeps ``delay_s`` more at ``slow_steps``, then is back to
    normal and must be re-admitted and re-synchronised. ``mode``: "ddp" (DDP + hook) or
    "group" (:meth:`MemoryAwareGroup.average_gradients` after the backward pass)."""
    torch.manual_seed(0)
    model = SmallMLP()
    cfg = ExchangeConfig(
        k=None,
        deadline_s=4.0,
        refresh_every=2,
        refresh_deadline_s=0.3,
        readmit_wait_s=3.0,
        readmit_ratio=1.5,
    )
    if mode == "ddp":
        net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        exchange = register_memory_aware_hook(net, cfg)
        group = None
    else:
        net, group = model, MemoryAwareGroup(cfg)
        exchange = group.exchange
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    participants, resync_step, transports = [], None, []
    for step in range(steps):
        x, y = mlp_batch(rank, step)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        time.sleep(compute_s + (delay_s if rank == slow_rank and step in slow_steps else 0.0))
        before = exchange.stats.resyncs
        loss.backward()
        if group is not None:
            group.average_gradients(model)
        if exchange.stats.resyncs > before:
            resync_step = step
        participants.append(exchange.last_participants)
        transports.append(exchange.transport)
        opt.step()
    exchange.finish(timeout_s=10.0)
    torch.save(
        {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "participants": participants,
            "transports": transports,
            "views": exchange.views,
            "resync_step": resync_step,
            "stats": {
                "readmitted": exchange.stats.readmitted,
                "resyncs": exchange.stats.resyncs,
                "resync_failures": exchange.stats.resync_failures,
                "excluded_epochs": exchange.stats.excluded_epochs,
            },
        },
        Path(out) / f"readmit_rank{rank}.pt",
    )
    dist.destroy_process_group()


def collective_deadline_worker(
    rank: int, world: int, out: str, late_rank: int, late_step: int, delay_s: float, steps: int
) -> None:
    """k = all (subgroup all-reduce); ``late_rank`` arrives ``delay_s`` late at ``late_step``."""
    ex = PeerExchange(
        ExchangeConfig(k=None, deadline_s=0.5, refresh_every=4, refresh_deadline_s=5.0)
    )
    rows = []
    for step in range(steps):
        ex.begin_step()
        if rank == late_rank and step == late_step:
            time.sleep(delay_s)
        t = step_tensor(rank, step)
        start = time.perf_counter()
        res = ex.exchange(t)
        rows.append(
            {
                "result": res,
                "participants": ex.last_participants,
                "transport": ex.transport,
                "elapsed_s": time.perf_counter() - start,
            }
        )
    ex.finish(timeout_s=5.0)
    torch.save(
        {
            "rows": rows,
            "collective_failures": ex.stats.collective_failures,
            "generations": [max(r.collective_gen for r in ex.view.values())],
        },
        Path(out) / f"collective_rank{rank}.pt",
    )


def equality_worker(rank: int, world: int, out: str) -> None:
    """k = all through both transports, and torch.distributed's own all-reduce average."""
    record: dict = {"inputs": [step_tensor(rank, 0), step_tensor(rank, 1, n=40).float()]}
    reference = []
    for t in record["inputs"]:
        summed = t.clone()
        dist.all_reduce(summed)
        reference.append(summed / world)
    record["allreduce"] = reference
    for collective in (True, False):
        ex = PeerExchange(ExchangeConfig(k=None, deadline_s=20.0, collective=collective))
        ex.begin_step()
        record[f"collective={collective}"] = {
            "results": [ex.exchange(t) for t in record["inputs"]],
            "transport": ex.transport,
        }
        ex.finish()
    torch.save(record, Path(out) / f"equality_rank{rank}.pt")
    dist.destroy_process_group()


def _listen_addresses(pid: int) -> list[str]:
    """Local addresses ("ip:port") of the TCP sockets process ``pid`` listens on (Linux
    /proc: the process's socket inodes matched against /proc/net/tcp and tcp6)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                local, state, inode = parts[1], parts[3], parts[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                addr_hex, port_hex = local.split(":")
                raw = bytes.fromhex(addr_hex)
                if width == 8:
                    ip = ".".join(str(b) for b in raw[::-1])
                else:  # four little-endian 32-bit words
                    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
                    ip = b"".join(words).hex()
                found.append(f"{ip}:{int(port_hex, 16)}")
    return found


def store_listen_worker(rank: int, world: int, out: str) -> None:
    """Rank 0 records where the launcher (its parent, which hosts the store) listens."""
    if rank == 0:
        Path(out).write_text("\n".join(_listen_addresses(os.getppid())))
    dist.barrier()
