"""``train.py distributed=memory_aware``: data-parallel training with the memory-aware hook.

    python train.py distributed=memory_aware distributed.world_size=2   # spawns 2 ranks
    torchrun --nproc-per-node 2 train.py distributed=memory_aware hydra.run.dir=outputs/ddp

Without ``torchrun`` the ranks are started by :func:`sedma_torch.distributed.spawn` (gloo on
127.0.0.1; the launching process hosts the rendezvous store and waits, so a rank that dies
does not stop the others). Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment)
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
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

__all__ = ["DistributedContext", "exchange_config", "run_train_distributed"]

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
_LAUNCH_KEYS = ("enabled", "world_size", "launch_timeout_s", "pg_timeout_s", "threads_per_rank")


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
    return ExchangeConfig(**kwargs)


class DistributedContext:
    """What :func:`~sedma_torch.experiments.run_train` needs to know about the group."""

    def __init__(self, dist_cfg: Mapping[str, Any]) -> None:
        self.config = exchange_config(dist_cfg)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.exchanges: list[Any] = []

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

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DDP with the memory-aware hook (one exchange per phase)."""
        from ..distributed import register_memory_aware_hook

        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        self.exchanges.append(register_memory_aware_hook(ddp, self.config))
        return ddp

    def stats(self) -> list[dict[str, Any]]:
        """Exchange counters of every phase (this rank)."""
        rows = []
        for ex in self.exchanges:
            s = ex.stats
            rows.append(
                {
                    "exchanges": s.exchanges,
                    "collective_exchanges": s.collective_exchanges,
                    "collective_failures": s.collective_failures,
                    "received": s.received,
                    "timeouts": s.timeouts,
                    "bytes_sent": s.bytes_sent,
                    "refreshes": s.refreshes,
                    "excluded_epochs": s.excluded_epochs,
                    "readmitted": s.readmitted,
                    "dead": sorted(s.dead),
                }
            )
        return rows

    def finish(self, run_dir: Path, models: Mapping[str, nn.Module]) -> None:
        """Write this rank's replica and counters, then end every exchange (bounded)."""
        folder = Path(run_dir) / "replicas"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "rank": self.rank,
                "world_size": self.world_size,
                "models": {k: m.state_dict() for k, m in models.items()},
                "exchange": self.stats(),
            },
            folder / f"rank{self.rank}.pt",
        )
        for ex in self.exchanges:
            ex.finish()


def _worker(rank: int, world_size: int, cfg: dict, run_dir: str, rram_label: str) -> None:
    from .training import run_train

    run_train(
        cfg,
        run_dir,
        rram_label=rram_label,
        distributed=DistributedContext(cfg["distributed"]),
    )
    dist.destroy_process_group()


def _positive_int(dist_cfg: Mapping[str, Any], key: str, default: int) -> int:
    value = dist_cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"distributed.{key} must be an integer >= 1, got {value!r}")
    return value


def run_train_distributed(cfg: Mapping[str, Any], run_dir: str | Path, *, rram_label: str) -> dict:
    """Run :func:`~sedma_torch.experiments.run_train` on every rank (see the module
    docstring); returns rank 0's payload (read back from ``results.json`` when spawned,
    an empty dict on ranks > 0 under torchrun)."""
    import json

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
    from ..distributed import spawn

    world_size = _positive_int(dist_cfg, "world_size", 2)
    codes = spawn(
        _worker,
        world_size,
        (dict(cfg), str(run_dir), rram_label),
        timeout_s=float(dist_cfg.get("launch_timeout_s", 86_400)),
        pg_timeout_s=pg_timeout,
        threads=_positive_int(dist_cfg, "threads_per_rank", 1),
    )
    if codes[0] != 0:
        raise RuntimeError(f"distributed training: rank 0 failed (exit codes {codes})")
    if any(c != 0 for c in codes):
        print(f"distributed training: some ranks failed, rank 0 finished (exit codes {codes})")
    return json.loads((Path(run_dir) / "results.json").read_text())
