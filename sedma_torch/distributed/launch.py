"""A small launcher that survives a dying worker (for tests, benchmarks and fault drills).

``torchrun``'s agent stops every worker when one fails; :func:`launch` (and :func:`spawn`,
which returns its exit codes only) instead starts ``world_size`` processes
(``multiprocessing`` spawn context), hosts the rendezvous ``TCPStore`` in the parent (so
it outlives any worker), watches them, and reports how each one ended. The store listens
on 127.0.0.1 only (it has no authentication).

What the launcher watches
-------------------------
* **Exits.** A worker that ends with a non-zero exit code or by a signal is reported at
  once (``log``) and published in the store (:func:`reported_down`), so that the
  survivors need not wait for it.
* **Responsiveness.** Every worker runs a heartbeat thread that writes the time into
  shared memory every 0.2 s. A worker whose heartbeat is older than ``unresponsive_s``,
  or whose process is stopped (``SIGSTOP``: state ``T`` in ``/proc/<pid>/stat``), is
  *unresponsive*; it is published in the store too (and withdrawn when it recovers).
  A worker stopped before its heartbeat started is not detected until ``timeout_s``.
* **The end of the job** (with ``exit_grace_s`` set). The job is over when ``primary``
  (e.g. the rank that writes the results) has ended, or when at least one worker has
  ended and every worker still running is unresponsive. The workers still running then
  get ``exit_grace_s`` seconds to exit and are killed (``SIGKILL``); a stopped worker is
  therefore never waited for longer than ``exit_grace_s`` (plus ``unresponsive_s`` for
  a hung one that is not stopped) after the others have finished. Without
  ``exit_grace_s`` the launcher waits for every worker, as :func:`spawn` always did.
* **The wall-clock limit** ``timeout_s``: workers still running are killed.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import multiprocessing.util
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["LaunchResult", "RankOutcome", "launch", "reported_down", "spawn"]

_DOWN_KEY = "sedma/launch/down/"
_HEARTBEAT_S = 0.2
_POLL_S = 0.05

# In a worker started by launch(): the rendezvous store (the launcher publishes there the
# ranks it found dead or unresponsive). None in any other process.
_launcher_store: Any | None = None


@dataclass(frozen=True)
class RankOutcome:
    """How one worker ended."""

    rank: int
    pid: int | None
    exit_code: int | None
    """As ``multiprocessing`` reports it (negative: killed by that signal); None when the
    launcher killed it."""
    status: str
    """``ok`` (exit code 0), ``failed`` (non-zero exit code), ``signalled`` (killed by a
    signal it did not get from the launcher), ``unresponsive`` (killed by the launcher
    after the others had finished: stopped or without heartbeat), ``lingering`` (killed by
    the launcher: still running ``exit_grace_s`` after the job was over) or ``timeout``
    (killed at ``timeout_s``)."""
    detail: str
    """What happened, in words (exit code, signal name, how long it was unresponsive)."""
    ended_s: float
    """Seconds from the start of the launch to the end of the worker."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "status": self.status,
            "detail": self.detail,
            "ended_s": round(self.ended_s, 3),
        }


@dataclass(frozen=True)
class LaunchResult:
    """The outcome of every worker of a :func:`launch`."""

    outcomes: list[RankOutcome]
    seconds: float
    """Wall-clock time of the launch."""

    @property
    def codes(self) -> list[int | None]:
        """Exit codes by rank (None: killed by the launcher)."""
        return [o.exit_code for o in self.outcomes]

    @property
    def failed(self) -> list[RankOutcome]:
        """The workers that did not end with exit code 0."""
        return [o for o in self.outcomes if not o.ok]


def _heartbeat(beats: Any, rank: int) -> None:
    while True:
        beats[rank] = time.monotonic()
        time.sleep(_HEARTBEAT_S)


def _entry(
    fn: Callable[..., None],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    pg_timeout_s: float,
    threads: int,
    args: Sequence[Any],
    beats: Any = None,
) -> None:
    global _launcher_store
    if beats is not None:
        beats[rank] = time.monotonic()
        threading.Thread(target=_heartbeat, args=(beats, rank), daemon=True).start()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    store = dist.TCPStore(
        "127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=pg_timeout_s)
    )
    _launcher_store = store
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
    # Only multiprocessing's own exit finalizers run: they unlink the semaphores this rank
    # created (tqdm's lock, even for a disabled bar), which the spawn context's resource
    # tracker otherwise reports as "leaked semaphore objects" at shutdown.
    multiprocessing.util._run_finalizers(0)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def reported_down(ranks: Sequence[int]) -> dict[int, str]:
    """Of ``ranks`` (global ranks), those the launcher has found dead or unresponsive,
    with what it found. Only in a worker started by :func:`launch` / :func:`spawn`;
    elsewhere (e.g. under ``torchrun``) always ``{}``."""
    store = _launcher_store
    if store is None:
        return {}
    down = {}
    for r in ranks:
        key = f"{_DOWN_KEY}{r}"
        try:
            if store.check([key]):
                down[r] = store.get(key).decode()
        except RuntimeError:  # the launcher is gone: nothing to learn from it
            return down
    return down


def _publish(store: Any, rank: int, what: str | None) -> None:
    """Publish (None: withdraw) what the launcher found about ``rank``."""
    key = f"{_DOWN_KEY}{rank}"
    try:
        if what is None:
            store.delete_key(key)
        else:
            store.set(key, what)
    except RuntimeError:
        pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _process_state(pid: int | None) -> str | None:
    """The state letter of ``/proc/<pid>/stat`` (``T``: stopped), None when unreadable."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def launch(
    fn: Callable[..., None],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 120.0,
    backend: str = "gloo",
    pg_timeout_s: float = 60.0,
    threads: int = 1,
    exit_grace_s: float | None = None,
    unresponsive_s: float = 10.0,
    primary: int | None = None,
    log: Callable[[str], None] | None = None,
) -> LaunchResult:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes with an initialised
    process group and report how each one ended (see the module docstring).

    ``fn`` must be importable (a module-level function). Each worker uses ``threads``
    intra-op threads. A worker that dies does not stop the others. ``exit_grace_s``
    (None: wait for every worker up to ``timeout_s``) bounds the wait for workers still
    running once the job is over: after ``primary`` ended, or after the responsive
    workers ended. ``log`` receives one line per event (start, a worker dead or
    unresponsive, a worker killed).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if exit_grace_s is not None and not exit_grace_s >= 0:
        raise ValueError(f"exit_grace_s must be None or a number >= 0, got {exit_grace_s!r}")
    if not unresponsive_s > 0:
        raise ValueError(f"unresponsive_s must be a number > 0, got {unresponsive_s!r}")
    if primary is not None and not 0 <= primary < world_size:
        raise ValueError(f"primary must be None or a rank in [0, {world_size}), got {primary!r}")
    say = log or (lambda line: None)
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
    beats = ctx.Array("d", world_size, lock=False)  # heartbeats (0: not started yet)
    procs = [
        ctx.Process(
            target=_entry,
            args=(
                fn,
                rank,
                world_size,
                store.port,
                backend,
                pg_timeout_s,
                threads,
                tuple(args),
                beats,
            ),
        )
        for rank in range(world_size)
    ]
    start = time.monotonic()
    for p in procs:
        p.start()
    say(
        f"distributed: started {world_size} rank(s): "
        + ", ".join(f"rank {r} pid {p.pid}" for r, p in enumerate(procs))
    )
    outcomes: dict[int, RankOutcome] = {}
    unresponsive: dict[int, str] = {}  # rank -> what was seen
    grace_from: float | None = None
    grace_why = ""

    def ended(rank: int, status: str, detail: str, code: int | None, now: float) -> None:
        outcomes[rank] = RankOutcome(rank, procs[rank].pid, code, status, detail, now - start)
        if status != "ok":
            say(f"distributed: rank {rank} (pid {procs[rank].pid}) {detail}")

    def kill(rank: int, status: str, detail: str, now: float) -> None:
        p = procs[rank]
        p.kill()
        p.join(5.0)
        ended(rank, status, detail, None, now)

    while True:
        now = time.monotonic()
        for r, p in enumerate(procs):
            if r in outcomes or p.is_alive():
                continue
            p.join()
            code = p.exitcode
            if code == 0:
                ended(r, "ok", "exited with code 0", code, now)
            elif code is not None and code < 0:
                name = _signal_name(-code)
                ended(r, "signalled", f"died: killed by {name} ({-code})", code, now)
            else:
                ended(r, "failed", f"failed: exit code {code}", code, now)
            if code != 0:
                _publish(store, r, outcomes[r].detail)
        alive = [r for r in range(world_size) if r not in outcomes]
        if not alive:
            break
        for r in alive:
            beat = beats[r]
            state = _process_state(procs[r].pid)
            what = None
            if state == "T":
                what = "unresponsive: stopped (SIGSTOP; process state T)"
            elif beat > 0 and now - beat > unresponsive_s:
                what = f"unresponsive: no heartbeat for {now - beat:.1f} s"
            if what is not None and r not in unresponsive:
                say(f"distributed: rank {r} (pid {procs[r].pid}) is {what}")
                _publish(store, r, what)
            elif what is None and r in unresponsive:
                say(f"distributed: rank {r} (pid {procs[r].pid}) is responsive again")
                _publish(store, r, None)
            if what is None:
                unresponsive.pop(r, None)
            elif r not in unresponsive:
                unresponsive[r] = what
        if now - start >= timeout_s:
            for r in alive:
                kill(r, "timeout", f"killed: still running at timeout_s={timeout_s:g} s", now)
            break
        if exit_grace_s is not None:
            why = ""
            if primary is not None and primary in outcomes:
                why = f"after rank {primary} ended"
            elif outcomes and all(r in unresponsive for r in alive):
                why = "after every responsive rank ended"
            if not why:
                grace_from = None
            elif grace_from is None:
                grace_from, grace_why = now, why
            if grace_from is not None and now - grace_from >= exit_grace_s:
                for r in alive:
                    if r in unresponsive:
                        status, what = "unresponsive", unresponsive[r]
                    else:
                        status, what = "lingering", "still running"
                    kill(
                        r,
                        status,
                        f"killed (SIGKILL): {what}, {exit_grace_s:g} s {grace_why}",
                        now,
                    )
                break
        time.sleep(_POLL_S)
    del store
    result = [outcomes[r] for r in range(world_size)]
    return LaunchResult(result, time.monotonic() - start)


def spawn(
    fn: Callable[..., None],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 120.0,
    backend: str = "gloo",
    pg_timeout_s: float = 60.0,
    threads: int = 1,
    **kwargs: Any,
) -> list[int | None]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes with an initialised
    process group; return their exit codes (None: killed by the launcher, e.g. at
    ``timeout_s``).

    ``fn`` must be importable (a module-level function). Each worker uses ``threads``
    intra-op threads. A worker that dies does not stop the others. Other keyword
    arguments go to :func:`launch` (which also says how each worker ended).
    """
    return launch(
        fn,
        world_size,
        args,
        timeout_s=timeout_s,
        backend=backend,
        pg_timeout_s=pg_timeout_s,
        threads=threads,
        **kwargs,
    ).codes


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
