"""A worker started by ``torchrun`` in the tests (run as a script, not imported by pytest).

    PYTHONPATH=<repo> torchrun --standalone --nproc-per-node N \
        tests/distributed/torchrun_worker.py OUT STEPS KILL_RANK KILL_STEP

Every rank averages ``step_tensor(rank, step)`` with all peers through
:class:`~sedma_torch.distributed.MemoryAwareGroup` (k = all) for ``STEPS`` steps, saving
its results to ``OUT/torchrun_rank<r>.pt`` after every step; rank ``KILL_RANK`` (-1: none)
SIGKILLs itself at ``KILL_STEP``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sedma_torch.distributed import ExchangeConfig, MemoryAwareGroup
from tests.distributed.workers import step_tensor


def _save(record: dict, path: Path) -> None:
    """Atomically: the agent may stop this process in the middle of a save."""
    tmp = path.with_suffix(".tmp")
    torch.save(record, tmp)
    os.replace(tmp, path)


def main() -> None:
    out, steps, kill_rank, kill_step = Path(sys.argv[1]), *map(int, sys.argv[2:5])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = MemoryAwareGroup(
        ExchangeConfig(k=None, deadline_s=3.0, refresh_every=2, refresh_deadline_s=3.0)
    )
    record: dict = {"results": [], "participants": [], "pid": os.getpid()}
    for step in range(steps):
        group.begin_step()
        if rank == kill_rank and step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        record["results"].append(group.all_reduce(step_tensor(rank, step)).clone())
        record["participants"].append(group.exchange.last_participants)
        record["time"] = time.time()
        _save(record, out / f"torchrun_rank{rank}.pt")
        time.sleep(0.05)
    record["finished"] = group.finish(timeout_s=5.0)
    _save(record, out / f"torchrun_rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
