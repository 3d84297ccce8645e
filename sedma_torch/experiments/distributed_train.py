"""``train.py distributed=memory_aware``: data-parallel training with the memory-aware hook.

    python train.py distributed=memory_aware distributed.world_size=2   # spawns 2 ranks
    torchrun --nproc-per-node 2 train.py distributed=memory_aware hydra.run.dir=outputs/ddp

Without ``torchrun`` the ranks are started by :func:`sedma_torch.distributed.launch.launch`
(gloo on 127.0.0.1; the launching process hosts the rendezvous store and watches the
ranks, so a rank that dies does not stop the others). Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment)
the process joins torchrun's group instead; every rank then uses rank 0's run folder
(shared through the store: Hydra's default folder is a timestamp each process computes for
itself). torchrun's agent stops every worker when one fails.

Every rank trains on its own shard of the training set (``rank::world_size``, cut to the
same length on every rank, so every rank runs the same number of steps and exchanges)
through ``DistributedDataParallel(broadcast_buffers=False)`` with
:func:`sedma_torch.distributed.register_memory_aware_hook`, in both the digital and the
hardware-aware phase. Rank 0 evaluates, logs, checkpoints and writes the results; ranks
> 0 use no long-term memory, logger or deployment hook. Every rank writes its final
weights to ``<run dir>/replicas/rank<r>.pt`` with its exchange counters, so that the
replicas can be compared (with ``k`` null and nobody late they are identical).

A dead rank
-----------
Within a phase the exchange leaves a dead or stopped rank out (deadline-bounded; see
:mod:`sedma_torch.distributed.exchange`). DDP's constructor, though, runs collectives
over its whole group with no deadline (a parameter broadcast and a shape check), so the
next phase cannot build DDP over the world once a rank is gone. At every phase after the
first, the ranks therefore agree on the *members* of the phase (through the store, with
rank 0 deciding): rank 0 waits for every member of the previous phase, at most
``phase_join_s`` (default ``refresh_deadline_s + readmit_wait_s``), but not for a rank
whose transfers failed (the exchange found it dead) or that the launcher reports dead or
unresponsive (:func:`sedma_torch.distributed.launch.reported_down`: an exit, a signal, a
``SIGSTOP``, no heartbeat for ``unresponsive_s``). When the members are the previous
ones and the previous exchange saw no failure, the phase uses the same group as before;
otherwise DDP is built over a new gloo group of the members only
(``dist.new_group(members, use_local_synchronization=True)``, which the other ranks need
not join). A rank that arrives after the members were fixed is not one of them: it
leaves with exit code 3 (``EXIT_LEFT``). The shards stay as they were (the samples of a
lost rank are not trained on any more). Rank 0 is needed for the results: when it is
down, the others stop at the next phase boundary. Not covered: a member lost between its
arrival at the boundary and the end of DDP's construction (milliseconds): the phase then
fails after ``pg_timeout_s``.

``results.json`` records under ``distributed``: ``members`` (the final members),
``phases`` (the members of every phase), ``lost_ranks`` (as rank 0 saw it: each lost
rank, the phase it was missing from, or lost in when it is the last one, and why), and,
written by the launcher after every rank ended, ``ranks`` (how each rank ended: exit
code, signal, unresponsive and killed) and ``failed_ranks``.

The launcher (spawned runs) reports a dead or unresponsive rank when it sees it, ends
the job ``exit_grace_s`` (default 10) after rank 0 has ended (a rank still running then,
e.g. a stopped one, is killed with ``SIGKILL``), and exits with code 0 when rank 0
finished and wrote the results (the lost ranks are printed on stderr and recorded in
``results.json``), or raises (exit code 1) when rank 0 failed. ``exit_grace_s``,
``unresponsive_s`` (default 10) and ``phase_join_s`` (null: the default above) are keys of
the ``distributed`` group.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

__all__ = [
    "EXIT_LEFT",
    "DistributedContext",
    "RankLeft",
    "exchange_config",
    "run_train_distributed",
]

_EXCHANGE_KEYS = (
    "k",
    "deadline_s",
    "refresh_every",
    "refresh_deadline_s",
    "readmit_wait_s",
    "readmit_ratio",
    "collective",
    "weights",
    "eta",
    "temperature",
)
_LAUNCH_KEYS = (
    "enabled",
    "world_size",
    "launch_timeout_s",
    "pg_timeout_s",
    "threads_per_rank",
    "exit_grace_s",
    "unresponsive_s",
    "phase_join_s",
)
EXIT_LEFT = 3
"""Exit code of a rank that left the job: not a member of a phase (it arrived after rank 0
had fixed the members), or rank 0 down."""


class RankLeft(Exception):
    """This rank cannot go on with the others (see :data:`EXIT_LEFT`)."""


def _seconds(dist_cfg: Mapping[str, Any], key: str, default: float, *, zero: bool) -> float:
    """``distributed.<key>`` in seconds (missing or null: ``default``), validated."""
    value = dist_cfg.get(key)
    if value is None:
        value = default
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not (value >= 0 if zero else value > 0) or value == float("inf"):
        bound = ">= 0" if zero else "> 0"
        raise ValueError(f"distributed.{key} must be a number {bound}, got {value!r}")
    return float(value)


def exchange_config(dist_cfg: Mapping[str, Any]):
    """The :class:`~sedma_torch.distributed.ExchangeConfig` of the ``distributed`` group."""
    from ..distributed import ExchangeConfig

    unknown = set(dist_cfg) - set(_EXCHANGE_KEYS) - set(_LAUNCH_KEYS)
    if unknown:
        raise ValueError(
            f"distributed: unknown key(s) {sorted(unknown)}; known: "
            f"{', '.join(_LAUNCH_KEYS + _EXCHANGE_KEYS)}"
        )
    kwargs = {k: dist_cfg[k] for k in _EXCHANGE_KEYS if k in dist_cfg}
    if "weights" in kwargs:
        kwargs["weights"] = tuple(float(w) for w in kwargs["weights"])
    config = ExchangeConfig(**kwargs)
    _seconds(dist_cfg, "exit_grace_s", 10.0, zero=True)
    _seconds(dist_cfg, "unresponsive_s", 10.0, zero=False)
    _seconds(dist_cfg, "phase_join_s", 0.0, zero=True)
    return config


class DistributedContext:
    """What :func:`~sedma_torch.experiments.run_train` needs to know about the group."""

    def __init__(self, dist_cfg: Mapping[str, Any]) -> None:
        self.config = exchange_config(dist_cfg)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.exchanges: list[Any] = []
        self.members: list[int] = list(range(self.world_size))
        """Global ranks of the current phase (rank 0 first)."""
        self.group: Any | None = None
        """Process group of the current phase's DDP (None: the default group)."""
        self.phases: list[dict[str, Any]] = []
        """Name and members of every phase so far."""
        self.lost: dict[int, dict[str, str]] = {}
        """Ranks left out at a phase boundary: the phase they missed and why."""
        self.join_s = _seconds(
            dist_cfg,
            "phase_join_s",
            self.config.refresh_deadline_s + self.config.readmit_wait_s,
            zero=True,
        )
        self.pg_timeout_s = float(dist_cfg.get("pg_timeout_s", 300))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, dataset: Dataset) -> Dataset:
        """This rank's shard: every ``world_size``-th sample from ``rank``, cut to the
        length of the shortest shard."""
        n = len(dataset) // self.world_size  # type: ignore[arg-type]
        if n == 0:
            raise ValueError(
                f"distributed: {len(dataset)} training samples cannot be shared by "  # type: ignore[arg-type]
                f"world_size={self.world_size} ranks"
            )
        return Subset(dataset, list(range(self.rank, n * self.world_size, self.world_size)))

    def wrap(self, model: nn.Module, phase: str | None = None) -> nn.Module:
        """``model`` under DDP with the memory-aware hook (one exchange per phase), over the
        members of the phase (agreed with the others from the second phase on)."""
        from ..distributed import register_memory_aware_hook

        name = phase or f"phase {len(self.exchanges) + 1}"
        if self.exchanges:
            self._agree_members(name)
        with warnings.catch_warnings():
            # torch 2.14 deprecates broadcast_buffers for forward_sync_buffers, whose False
            # still broadcasts rank 0's buffers at init; the replicas' buffers (programmed
            # conductances, RNG counters) must stay rank-local, so keep broadcast_buffers=False
            # as torch's warning itself advises until init_sync_buffers exists, and drop
            # exactly that warning (printed once per rank and phase otherwise)
            warnings.filterwarnings(
                "ignore", message=r"`broadcast_buffers` is deprecated", category=FutureWarning
            )
            ddp = nn.parallel.DistributedDataParallel(
                model, process_group=self.group, broadcast_buffers=False
            )
        self.exchanges.append(register_memory_aware_hook(ddp, self.config))
        self.phases.append({"phase": name, "members": list(self.members)})
        return ddp

    # ----- phase boundaries ---------------------------------------------------------
    def _agree_members(self, phase: str) -> None:
        """Rank 0 fixes the members of ``phase`` (see the module docstring); the others
        read them. Raises :class:`RankLeft` on a rank that is not a member, or when rank 0
        is down."""
        from ..distributed.launch import reported_down

        store = dist.distributed_c10d._get_default_store()
        base = f"sedma/train/phase/{len(self.exchanges)}"
        decision_key = f"{base}/members"
        store.set(f"{base}/arrived/{self.rank}", "1")
        if self.is_main:
            decision = self._decide_members(store, base, phase)
            store.set(decision_key, json.dumps(decision))
        else:
            deadline = time.monotonic() + self.pg_timeout_s
            while not store.check([decision_key]):
                down = reported_down([0])
                if down:
                    raise RankLeft(f"rank 0 is down ({down[0]}): no {phase} phase")
                if time.monotonic() > deadline:
                    raise RankLeft(
                        f"rank 0 did not start the {phase} phase within pg_timeout_s="
                        f"{self.pg_timeout_s:g} s"
                    )
                time.sleep(0.01)
            decision = json.loads(store.get(decision_key))
        members = [int(r) for r in decision["members"]]
        for r, why in decision["lost"].items():
            self.lost[int(r)] = {"phase": phase, "reason": why}
        if self.rank not in members:
            raise RankLeft(
                f"left out of the {phase} phase: rank 0 started it with ranks {members} "
                f"before this rank arrived (phase_join_s={self.join_s:g} s)"
            )
        if decision["fresh"]:
            self.group = dist.new_group(
                members,
                backend="gloo",
                timeout=datetime.timedelta(seconds=self.pg_timeout_s),
                use_local_synchronization=True,
            )
        self.members = members
        if len(members) < self.world_size and self.is_main:
            print(
                f"distributed: {phase} phase with ranks {members} (lost: "
                + "; ".join(f"rank {r}: {v['reason']}" for r, v in sorted(self.lost.items()))
                + ")",
                flush=True,
            )

    def _decide_members(self, store: Any, base: str, phase: str) -> dict[str, Any]:
        from ..distributed.launch import reported_down

        previous = self.exchanges[-1]
        local = self.phases[-1]["members"]
        dead = {local[r] for r in previous.stats.dead}
        waiting = [r for r in self.members if r != self.rank and r not in dead]
        arrived = {self.rank}
        lost: dict[int, str] = {}
        deadline = time.monotonic() + self.join_s
        while True:
            for r in list(waiting):
                if store.check([f"{base}/arrived/{r}"]):
                    arrived.add(r)
                    waiting.remove(r)
            for r, what in reported_down(waiting).items():
                lost[r] = f"{what} (seen by the launcher)"
                waiting.remove(r)
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        for r in self.members:  # a last look: one found dead or down may have arrived
            if r not in arrived and store.check([f"{base}/arrived/{r}"]):
                arrived.add(r)
        for r in self.members:
            if r in arrived:
                lost.pop(r, None)
            elif r in dead:
                lost[r] = f"its transfers failed in the {self.phases[-1]['phase']} phase (dead)"
            elif r not in lost:
                lost[r] = f"did not reach the {phase} phase within phase_join_s={self.join_s:g} s"
        members = sorted(arrived)
        s = previous.stats
        troubled = bool(s.dead or s.timeouts or s.collective_failures or s.excluded_epochs)
        return {
            "members": members,
            "fresh": members != self.members or troubled,
            "lost": {str(r): why for r, why in sorted(lost.items())},
        }

    # ----- reporting ----------------------------------------------------------------
    def stats(self) -> list[dict[str, Any]]:
        """Exchange counters of every phase (this rank); ranks are global ranks."""
        rows = []
        for ex, info in zip(self.exchanges, self.phases, strict=True):
            s = ex.stats
            members = info["members"]
            rows.append(
                {
                    "phase": info["phase"],
                    "members": list(members),
                    "exchanges": s.exchanges,
                    "collective_exchanges": s.collective_exchanges,
                    "collective_failures": s.collective_failures,
                    "received": s.received,
                    "timeouts": s.timeouts,
                    "bytes_sent": s.bytes_sent,
                    "refreshes": s.refreshes,
                    "excluded_epochs": s.excluded_epochs,
                    "readmitted": s.readmitted,
                    "dead": sorted(members[r] for r in s.dead),
                }
            )
        return rows

    def lost_ranks(self) -> list[dict[str, Any]]:
        """Ranks lost so far as this rank sees them: left out at a phase boundary, found
        dead by the last phase's exchange, or missing from its latest view."""
        lost = {r: dict(v) for r, v in self.lost.items()}
        if self.exchanges:
            ex, info = self.exchanges[-1], self.phases[-1]
            members, phase = info["members"], info["phase"]
            for r in sorted(ex.stats.dead):
                lost.setdefault(
                    members[r], {"phase": phase, "reason": "its transfers failed (dead)"}
                )
            if ex.views:
                seen = {members[r] for r in ex.views[-1]}
                for r in members:
                    if r not in seen:
                        lost.setdefault(
                            r,
                            {
                                "phase": phase,
                                "reason": "left out of the last exchange view (late, "
                                "stopped or dead)",
                            },
                        )
        return [{"rank": r, **v} for r, v in sorted(lost.items())]

    def summary(self) -> dict[str, Any]:
        """The ``distributed`` section of ``results.json`` (rank 0)."""
        return {
            "world_size": self.world_size,
            "members": list(self.members),
            "phases": [dict(p) for p in self.phases],
            "lost_ranks": self.lost_ranks(),
            "exchange": self.stats(),
        }

    def finish(self, run_dir: Path, models: Mapping[str, nn.Module]) -> None:
        """Write this rank's replica and counters, then end every exchange (bounded)."""
        folder = Path(run_dir) / "replicas"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "rank": self.rank,
                "world_size": self.world_size,
                "members": list(self.members),
                "models": {k: m.state_dict() for k, m in models.items()},
                "exchange": self.stats(),
            },
            folder / f"rank{self.rank}.pt",
        )
        for ex, info in zip(self.exchanges, self.phases, strict=True):
            if ex is self.exchanges[-1] or info["members"] == self.members:
                ex.finish()
            else:  # a lost member would be waited for in vain: the members are past it
                ex.close(timeout_s=0.0)


def _worker(rank: int, world_size: int, cfg: dict, run_dir: str, rram_label: str) -> None:
    from .joblog import tee_from_env
    from .training import run_train

    tee_from_env()  # the table rank 0 prints goes to the job's log file too
    context = DistributedContext(cfg["distributed"])
    try:
        run_train(cfg, run_dir, rram_label=rram_label, distributed=context)
    except RankLeft as exc:
        print(f"distributed: rank {rank}: {exc}; leaving", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_LEFT)  # no finalization: gloo may still wait on the lost peers
    if context.members == list(range(world_size)) and not context.lost_ranks():
        dist.destroy_process_group()


def _positive_int(dist_cfg: Mapping[str, Any], key: str, default: int) -> int:
    value = dist_cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"distributed.{key} must be an integer >= 1, got {value!r}")
    return value


def _write_json_atomic(path: Path, payload: dict) -> None:
    from .compare import write_json

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_json(tmp, payload)
    os.replace(tmp, path)


def run_train_distributed(cfg: Mapping[str, Any], run_dir: str | Path, *, rram_label: str) -> dict:
    """Run :func:`~sedma_torch.experiments.run_train` on every rank (see the module
    docstring); returns rank 0's payload (read back from ``results.json`` when spawned,
    an empty dict on ranks > 0 under torchrun).

    Spawned: returns when every rank has ended (a rank still running ``exit_grace_s``
    after rank 0 ended is killed); raises RuntimeError when rank 0 failed (the message
    says how every rank ended); when other ranks were lost, says so on stderr and returns.
    """
    dist_cfg = dict(cfg["distributed"])
    exchange_config(dist_cfg)  # fail early on a bad config, before starting processes
    pg_timeout = float(dist_cfg.get("pg_timeout_s", 300))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=pg_timeout))
        store = dist.distributed_c10d._get_default_store()
        if dist.get_rank() == 0:
            store.set("sedma/train/run_dir", str(Path(run_dir).resolve()))
        shared_dir = store.get("sedma/train/run_dir").decode()
        _worker(dist.get_rank(), dist.get_world_size(), dict(cfg), shared_dir, rram_label)
        path = Path(shared_dir) / "results.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    from ..distributed.launch import launch

    world_size = _positive_int(dist_cfg, "world_size", 2)
    result = launch(
        _worker,
        world_size,
        (dict(cfg), str(run_dir), rram_label),
        timeout_s=float(dist_cfg.get("launch_timeout_s", 86_400)),
        pg_timeout_s=pg_timeout,
        threads=_positive_int(dist_cfg, "threads_per_rank", 1),
        exit_grace_s=_seconds(dist_cfg, "exit_grace_s", 10.0, zero=True),
        unresponsive_s=_seconds(dist_cfg, "unresponsive_s", 10.0, zero=False),
        primary=0,
        log=lambda line: print(line, flush=True),
    )
    how = "; ".join(f"rank {o.rank}: {o.detail}" for o in result.outcomes)
    path = Path(run_dir) / "results.json"
    if not result.outcomes[0].ok or not path.is_file():
        raise RuntimeError(
            f"distributed training: rank 0 failed, no results (exit codes {result.codes}; {how})"
        )
    payload = json.loads(path.read_text())
    section = payload.setdefault("distributed", {})
    section["ranks"] = [o.to_dict() for o in result.outcomes]
    section["failed_ranks"] = [o.rank for o in result.failed]
    _write_json_atomic(path, payload)
    if result.failed:
        survivors = [o.rank for o in result.outcomes if o.ok]
        print(
            f"distributed training: finished with rank(s) {survivors}; lost "
            + "; ".join(f"rank {o.rank}: {o.detail}" for o in result.failed)
            + f" (results: {path})",
            file=sys.stderr,
            flush=True,
        )
    return payload
