"""A small launcher that survives a dying worker (for tests, benchmarks and fault drills).

``torchrun``'s agent stops every worker when one fails; :func:`spawn` instead starts
``world_size`` processes (``multiprocessing`` spawn context), hosts the rendezvous
``TCPStore`` in the parent (so it outlives any worker), waits for all of them with a
wall-clock limit, and kills those still running at the limit. The store listens on
127.0.0.1 only (it has no authentication).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["spawn"]


def _entry(
    fn: Callable[..., None],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    pg_timeout_s: float,
    threads: int,
    args: Sequence[Any],
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    store = dist.TCPStore(
        "127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=pg_timeout_s)
    )
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout_s),
    )
    fn(rank, world_size, *args)
    # gloo cannot cancel a posted operation: a receive whose sender gave up (the exchange's
    # deadline passed) keeps a waiter thread inside gloo, and interpreter finalization
    # with such a thread can abort ("terminate called without an active exception"). The
    # function has returned, so its work is done: flush and leave without finalization.
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def spawn(
    fn: Callable[..., None],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 120.0,
    backend: str = "gloo",
    pg_timeout_s: float = 60.0,
    threads: int = 1,
) -> list[int | None]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes with an initialised
    process group; return their exit codes (None: killed at ``timeout_s``).

    ``fn`` must be importable (a module-level function). Each worker uses ``threads``
    intra-op threads. A worker that dies does not stop the others.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    # The store's server would listen on every interface (TCPStore binds its master to
    # all addresses, whatever host it is given): hand it a socket bound to loopback only,
    # so that the unauthenticated rendezvous is reachable from this machine alone.
    listener = _loopback_listener()
    try:
        store = dist.TCPStore(
            "127.0.0.1",
            listener.getsockname()[1],
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
            master_listen_fd=listener.fileno(),
        )
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store owns the descriptor now (and closes it)
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=_entry,
            args=(fn, rank, world_size, store.port, backend, pg_timeout_s, threads, tuple(args)),
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    limit = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(limit - time.monotonic(), 0.0))
    codes: list[int | None] = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5.0)
            codes.append(None)
        else:
            codes.append(p.exitcode)
    del store
    return codes


def _loopback_listener() -> socket.socket:
    """A listening TCP socket on 127.0.0.1 with a free port (the rendezvous store's)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock
