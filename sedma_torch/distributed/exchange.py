"""Memory-aware gradient exchange on torch.distributed: DDP comm hook and group wrapper.

How an exchange works
---------------------
Every ``refresh_every`` steps (refresh points are step-aligned: epoch ``e`` starts at step
``e * refresh_every`` on every rank) each rank measures its telemetry (availability, free
memory, a ping-pong RTT to every peer over the process group, its local step time),
publishes it as JSON in the process group's key/value store and waits up to
``refresh_deadline_s`` for the rows of the peers that answered its ping in time. The
first rank done waiting fixes the *view* of the epoch (the rows it has) with an atomic
``store.compare_set``; every rank then reads the same view, so every rank derives the same
schedule: for each member ``i`` the top ``k`` peers by the Eq. 7 score computed from
``i``'s own row (its RTTs, its weights) and the others' availability and free memory.

Two transports, chosen per epoch identically on every member from the view:

* **collective** (``k`` is None or ``k >= members - 1``, i.e. everybody averages with
  everybody, and ``collective=True``): one gloo ``allreduce`` over a subgroup of exactly
  the view's members, then a division by their number: the cost of DDP's own all-reduce
  (a ring: each rank writes ``2 (n-1)/n`` of the tensor), bit-identical on every member.
  The subgroup is a ``ProcessGroupGloo`` created directly on a store prefix derived from
  the view (members and a *generation*), not with ``dist.new_group`` (whose naming counts
  every group a rank created, which diverges once ranks have seen different views). Its
  operation timeout is ``deadline_s``, so the deadline still holds: a member that does
  not arrive in time makes the collective fail with a timeout on the others, gloo closes
  the subgroup's connections (measured: "Application timeout caused pair closure"), the
  late member's collective then fails at once ("Connection closed by peer"), and a killed
  member fails it with "Connection closed by peer". Whoever sees a failure redoes that
  exchange point-to-point (below, deadline again, from an untouched copy of its tensor),
  uses point-to-point for the rest of the epoch and raises its ``collective_gen``; the
  next view takes the largest generation of its rows, so a broken subgroup is never
  reused and every member builds the same new one. Guarantee: an exchange waits at most
  ``deadline_s`` for the collective, plus ``deadline_s`` for the point-to-point redo after
  a failure; subgroup creation (once per new view, milliseconds) waits at most
  ``deadline_s`` for the members to connect, and on failure the epoch runs point-to-point.
* **point-to-point** (``k`` smaller): ``i`` averages its tensor with the tensors of the
  peers it selected; a peer sends its tensor to every rank that selected it. All transfers
  of one exchange are posted at once (``isend``/``irecv``, tag = exchange number), so no
  ordering can deadlock; each rank waits at most ``deadline_s`` and averages what arrived:
  its own tensor plus the arrived ones, summed in rank order and divided by their count.
  Send and receive buffers come from a pool (a fresh 47 MB buffer costs as much in page
  faults as the copy itself), and the result is written in place (into DDP's bucket).

A symmetric schedule for ``k`` < all (cliques derived from the scores, each doing a
subgroup all-reduce) is not used: with fixed scores the cliques stay the same and their
replicas drift apart for good; rotating them for mixing would ignore the scores.

Deadlines on gloo, and their limits
-----------------------------------
gloo cannot cancel a posted point-to-point operation, and ``work.wait(timeout)`` closes
the pair for good when it expires, and ``is_completed()`` does not progress without
``wait``. So every posted send/receive is waited on, without a timeout, by a small daemon
thread, and the caller waits on that thread's event with the deadline. A late tensor
still arrives later into its own buffer and is counted in ``stats.late_arrivals`` and
discarded (it never enters a later average, because every exchange has its own tag). A
peer whose transfer fails (a killed process closes its sockets: "Connection closed by
peer") or exceeds the process group's own timeout is marked dead and skipped from then on;
at the next refresh it publishes no row, so it leaves the view of every rank. The store
must outlive the workers: with ``torchrun`` it lives in the elastic agent, but torchrun's
agent stops every worker when one fails (its restart policy; with ``--max-restarts`` it
restarts the whole group from scratch), so a killed worker ends a torchrun job (cleanly,
no hang: ``tests/distributed/test_torchrun.py``); surviving it needs a launcher that keeps
the others running (e.g. :func:`sedma_torch.distributed.spawn`, whose parent hosts the
store). DDP itself runs collectives that have no deadline: the parameter broadcast at
construction, the bucket rebuild after the first iteration, and the buffer broadcast of
every forward pass unless ``broadcast_buffers=False``, which fault tolerance needs.
The exchange needs a gloo group; a CUDA tensor is copied to the CPU for it (NCCL's
waits do not honour deadlines).

Late ranks: exclusion and re-admission
--------------------------------------
A rank that reaches a refresh after the view was fixed is left out of that epoch: it
sends and receives nothing and trains on its own gradients. At a refresh the others wait
for a late rank (at most ``readmit_wait_s`` more, and only until some rank fixed the view)
when its latest published local step time is at most ``readmit_ratio`` times their own:
a rank that was slow for a while and is back to normal speed is waited for once (the time
it fell behind, bounded by ``readmit_wait_s``), so it is a member again; a persistently
slower rank is not waited for and stays out (otherwise every other epoch would run at its
pace). A late rank waited for in vain (still too far behind, or hung) is waited for again
only after 1, 2, 4, ... refreshes, so a hung rank costs ``readmit_wait_s`` a logarithmic
number of times. When a view re-admits ranks that the previous view left out, the
lowest-ranked member of both views sends its parameters to them (point-to-point, deadline
``deadline_s``; registered with :meth:`PeerExchange.track_parameters`, done by
:func:`register_memory_aware_hook` and :meth:`MemoryAwareGroup.average_gradients`), and
the re-admitted rank overwrites its drifted replica with them before its optimiser step
(with the DDP hook: at the end of the backward pass). With the collective transport all
members then apply the same averaged gradient, so their replicas are equal again (exactly,
for an optimiser without per-rank state such as plain SGD; momentum or Adam moments stay
each rank's own and are not re-synchronised). Steps are not copied: refresh points are
step-aligned, so a re-admitted rank is at the same step as the others. A rank that fell
behind by more than ``readmit_wait_s`` catches up by the others' wait for its pong at each
refresh (up to ``refresh_deadline_s`` per refresh) until the lag fits.

Backend registration
--------------------
No ``torch.distributed`` backend name is registered (``Backend.register_backend``): a
registered backend must implement the full ``ProcessGroup`` C++ interface (every
collective, with rank-for-rank matching), while this exchange is a deadline-bounded
average whose result may legitimately differ per rank (``k`` < all, or after a timeout) -
it cannot honour ``all_reduce(op=SUM)`` or ``broadcast`` semantics that DDP and other
libraries rely on. :class:`MemoryAwareGroup` offers the operations it can honour.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import statistics
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .selection import PeerFeatures, PeerSelector, normalised_terms
from .telemetry import Telemetry, measure_local

__all__ = [
    "ExchangeConfig",
    "ExchangeStats",
    "MemoryAwareGroup",
    "PeerExchange",
    "memory_aware_hook",
    "register_memory_aware_hook",
    "schedule_from_view",
]

_TAG_BITS = 28  # gloo tags are int32: kind (3 bits) | instance (8 bits) | counter (20 bits)
_COUNTER_BITS = 20
_KIND_PING, _KIND_PONG, _KIND_EXCHANGE, _KIND_BROADCAST, _KIND_SYNC = 1, 2, 3, 4, 5
_POOL_PER_SHAPE = 4  # free buffers kept per (numel, dtype)
_instances = itertools.count()


@dataclass(frozen=True)
class ExchangeConfig:
    """Settings of :class:`PeerExchange`."""

    k: int | None = None
    """Peers each rank averages with (top-k by Eq. 7), >= 0; None = every other rank
    (then the result equals the all-reduce average)."""
    deadline_s: float = 5.0
    """Longest wait for the peers' tensors in one exchange, in seconds (> 0)."""
    refresh_every: int = 50
    """Telemetry refresh (and re-selection) period in steps, >= 1."""
    refresh_deadline_s: float = 10.0
    """Longest wait for the others' telemetry at a refresh, in seconds (> 0)."""
    readmit_wait_s: float = 10.0
    """Longest extra wait at a refresh for a late rank worth re-admitting (>= 0; 0 = never
    wait for late ranks)."""
    readmit_ratio: float = 1.5
    """A late rank is worth waiting for when its local step time is at most this many
    times the waiting rank's own (> 0)."""
    collective: bool = True
    """Use a subgroup all-reduce when every member averages with every other one."""
    weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    """Initial Eq. 7 weights (availability, 1/latency, free memory)."""
    eta: float = 0.01
    """Learning rate of the Eq. 8-9 weight update."""
    temperature: float = 0.1
    """Softmax temperature of the success-rate estimate (see ``selection``)."""
    key_prefix: str = "sedma/exchange"
    """Prefix of this exchange's keys in the process group's store."""

    def __post_init__(self) -> None:
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int)):
            raise ValueError(f"ExchangeConfig.k must be None or an integer >= 0, got {self.k!r}")
        if self.k is not None and self.k < 0:
            raise ValueError(f"ExchangeConfig.k must be >= 0, got {self.k}")
        for name in ("deadline_s", "refresh_deadline_s", "readmit_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
                raise ValueError(f"ExchangeConfig.{name} must be a number > 0, got {value!r}")
        wait = self.readmit_wait_s
        if not (isinstance(wait, int | float) and wait >= 0 and math.isfinite(wait)):
            raise ValueError(f"ExchangeConfig.readmit_wait_s must be a number >= 0, got {wait!r}")
        if (
            isinstance(self.refresh_every, bool)
            or not isinstance(self.refresh_every, int)
            or self.refresh_every < 1
        ):
            raise ValueError(
                f"ExchangeConfig.refresh_every must be an integer >= 1, got {self.refresh_every!r}"
            )
        if not isinstance(self.collective, bool):
            raise ValueError(f"ExchangeConfig.collective must be a bool, got {self.collective!r}")


@dataclass
class ExchangeStats:
    """Counters of one :class:`PeerExchange` (this rank's view)."""

    exchanges: int = 0
    """Exchange calls."""
    collective_exchanges: int = 0
    """Of those, completed by a subgroup all-reduce."""
    collective_failures: int = 0
    """Collectives that failed (a member late or dead) and were redone point-to-point."""
    received: int = 0
    """Peer tensors that arrived before the deadline (and were averaged in)."""
    timeouts: int = 0
    """Peer tensors that missed the deadline."""
    late_arrivals: int = 0
    """Of those, how many arrived afterwards (discarded)."""
    bytes_sent: int = 0
    """Payload bytes this rank contributed (point-to-point: per peer; collective: the
    ring all-reduce's ``2 (n-1)/n`` of the tensor). Tensors only, not telemetry."""
    refreshes: int = 0
    """Telemetry refreshes."""
    excluded_epochs: int = 0
    """Refreshes whose view left this rank out (it then used its own tensor only)."""
    readmitted: int = 0
    """Views that took this rank back after a view that had left it out."""
    resyncs: int = 0
    """Parameter re-synchronisations received after a re-admission."""
    resync_failures: int = 0
    """Re-synchronisations that missed the deadline (the replica stayed as it was)."""
    dead: set[int] = field(default_factory=set)
    """Peers found dead (failed transfer), skipped from then on."""


class _Pending:
    """One posted gloo operation, waited on by a daemon thread (see the module docstring)."""

    __slots__ = ("buffer", "done_at", "error", "event", "peer", "work")

    def __init__(self, work: Any, peer: int, buffer: torch.Tensor) -> None:
        self.work = work
        self.peer = peer
        self.buffer = buffer
        self.error: BaseException | None = None
        self.done_at = math.inf
        self.event = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            self.work.wait()
        except BaseException as exc:  # a closed pair or the group's timeout
            self.error = exc
        self.done_at = time.perf_counter()
        self.event.set()

    @property
    def ok(self) -> bool:
        return self.event.is_set() and self.error is None


class _PingResponder(_Pending):
    """Receives a peer's ping and answers with a pong from the waiting thread."""

    __slots__ = ("group", "pong_tag", "to_global")

    def __init__(self, work, peer, buffer, pong_tag: int, group, to_global) -> None:
        self.pong_tag = pong_tag
        self.group = group
        self.to_global = to_global
        super().__init__(work, peer, buffer)

    def _run(self) -> None:
        try:
            self.work.wait()
            pong = dist.isend(
                self.buffer, dst=self.to_global(self.peer), group=self.group, tag=self.pong_tag
            )
            if pong is not None:
                pong.wait()
        except BaseException as exc:
            self.error = exc
        self.done_at = time.perf_counter()
        self.event.set()


class _BufferPool:
    """Flat CPU buffers reused across exchanges; a buffer returns to the pool only when
    every operation posted on it has finished (``release`` once per use)."""

    def __init__(self) -> None:
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self._uses: dict[int, int] = {}

    def take(self, numel: int, dtype: torch.dtype, uses: int = 1) -> torch.Tensor:
        free = self._free.get((numel, dtype))
        buffer = free.pop() if free else torch.empty(numel, dtype=dtype)
        self._uses[id(buffer)] = uses
        return buffer

    def retain(self, buffer: torch.Tensor) -> None:
        """One more operation uses ``buffer`` (a pooled one; others are ignored)."""
        if id(buffer) in self._uses:
            self._uses[id(buffer)] += 1

    def release(self, buffer: torch.Tensor) -> None:
        key = id(buffer)
        if key not in self._uses:
            return
        self._uses[key] -= 1
        if self._uses[key] <= 0:
            del self._uses[key]
            free = self._free.setdefault((buffer.numel(), buffer.dtype), [])
            if len(free) < _POOL_PER_SHAPE:
                free.append(buffer)


def schedule_from_view(
    view: Mapping[int, Telemetry], k: int | None, min_latency_ms: float = 1e-3
) -> dict[int, list[int]]:
    """For every member ``i`` of ``view``, the peers it averages with (best first).

    Member ``i`` scores every other member ``j`` with Eq. 7 from ``i``'s RTT to ``j``,
    ``j``'s availability and free memory, and ``i``'s weights, and keeps the top ``k``
    reachable ones; with ``k`` None every other member, those ``i`` has no RTT to (late at
    the ping but admitted to the view) last. A pure function of the view: every rank
    computes the same.
    """
    members = sorted(view)
    graph: dict[int, list[int]] = {}
    for i in members:
        candidates = {
            j: PeerFeatures(view[j].availability, view[i].rtt_ms[j], view[j].mem_free_gb)
            for j in members
            if j != i
        }
        selector = PeerSelector(view[i].weights, min_latency_ms=min_latency_ms)
        chosen = selector.select(candidates, len(candidates) if k is None else k)
        if k is None:
            chosen += [j for j in candidates if j not in chosen]
        graph[i] = chosen
    return graph


class PeerExchange:
    """Deadline-bounded averaging with selected peers over a torch.distributed group.

    Create one on every rank of ``group`` (same order of creation on every rank), call
    :meth:`begin_step` once per training step, then :meth:`exchange` (or the DDP hook)
    for each tensor to average. See the module docstring for the protocol.

    Args:
        config: :class:`ExchangeConfig`.
        group: the process group (default: the world); must be a gloo group.
        store: the key/value store shared by the ranks (default: the default group's).
        memory: long-term memory for transfer outcomes and learned weights (duck-typed;
            None: in-process).
        device: the device whose free memory and utilisation are reported.
    """

    def __init__(
        self,
        config: ExchangeConfig | None = None,
        *,
        group: Any | None = None,
        store: Any | None = None,
        memory: Any | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("PeerExchange needs torch.distributed initialised (gloo)")
        self.config = ExchangeConfig() if config is None else config
        if not isinstance(self.config, ExchangeConfig):
            raise TypeError(f"config must be an ExchangeConfig, got {type(config).__name__}")
        backend = dist.get_backend(group)
        if backend != "gloo":
            raise ValueError(
                f"PeerExchange needs a gloo group (deadlines), got backend {backend!r}; "
                "create one with dist.new_group(backend='gloo')"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.store = store if store is not None else dist.distributed_c10d._get_default_store()
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.selector = PeerSelector(
            self.config.weights,
            eta=self.config.eta,
            temperature=self.config.temperature,
            memory=memory,
            name=f"rank{self.rank}",
        )
        self.stats = ExchangeStats()
        self.step = 0
        self.view: dict[int, Telemetry] = {}
        self.graph: dict[int, list[int]] = {}
        self.sources: list[int] = []
        self.targets: list[int] = []
        self.views: list[list[int]] = []
        """Members of every view so far (the same list on every rank)."""
        self.schedules: list[dict[int, list[int]]] = []
        """The schedule (member -> selected peers) of every view so far (same on every rank)."""
        self._features: dict[int, np.ndarray] = {}
        self._instance = next(_instances)
        self._prefix = f"{self.config.key_prefix}/{self._instance}"
        self.last_participants: list[int] = []
        """Ranks whose tensors entered the latest exchange's average (this one included)."""
        self._epoch = 0
        self._calls = 0
        self._late: list[_Pending] = []
        self._pending_pings: list[_Pending] = []
        self._sends: list[_Pending] = []
        self._pool = _BufferPool()
        # collective transport
        self._collective: Any | None = None
        self._collective_members: list[int] = []
        self._collective_gen = 0
        self._subgroups: dict[tuple[tuple[int, ...], int], Any] = {}
        # local step timing (for re-admission) and parameter re-synchronisation
        self._step_started: float | None = None
        self._comm_s = 0.0
        self._local_ms: list[float] = []
        self._compute_ms: float | None = None
        self._params: list[torch.Tensor] = []
        self._readmit_fails: dict[int, int] = {}
        self._readmit_next: dict[int, int] = {}
        self._sync_buffers: list[torch.Tensor] | None = None

    # ----- helpers -------------------------------------------------------------------
    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _tag(self, kind: int, counter: int) -> int:
        instance = (self._instance & 0xFF) << _COUNTER_BITS
        return (kind << _TAG_BITS) | instance | (counter & ((1 << _COUNTER_BITS) - 1))

    def _mark_dead(self, peer: int) -> None:
        self.stats.dead.add(peer)

    def _post_send(self, buffer: torch.Tensor, peer: int, tag: int, payload: bool = True) -> bool:
        try:
            work = dist.isend(buffer, dst=self._global(peer), group=self.group, tag=tag)
        except RuntimeError:
            self._mark_dead(peer)
            return False
        self._sends.append(_Pending(work, peer, buffer))
        if payload:
            self.stats.bytes_sent += buffer.numel() * buffer.element_size()
        return True

    def _post_recv(self, buffer: torch.Tensor, peer: int, tag: int) -> _Pending | None:
        try:
            work = dist.irecv(buffer, src=self._global(peer), group=self.group, tag=tag)
        except RuntimeError:
            self._mark_dead(peer)
            return None
        return _Pending(work, peer, buffer)

    def _prune(self) -> None:
        still = []
        for p in self._late:
            if not p.event.is_set():
                still.append(p)
                continue
            if p.error is None:
                self.stats.late_arrivals += 1
            else:
                self._mark_dead(p.peer)
            self._pool.release(p.buffer)
        self._late = still
        pings = []
        for p in self._pending_pings:
            if not p.event.is_set():
                pings.append(p)
            elif p.error is not None:
                self._mark_dead(p.peer)
        self._pending_pings = pings
        sends = []
        for p in self._sends:
            if not p.event.is_set():
                sends.append(p)
                continue
            if p.error is not None:
                self._mark_dead(p.peer)
            self._pool.release(p.buffer)
        self._sends = sends

    def _alive_peers(self) -> list[int]:
        return [r for r in range(self.world_size) if r != self.rank and r not in self.stats.dead]

    @property
    def transport(self) -> str:
        """``"collective"`` or ``"p2p"``: how this epoch's exchanges run on this rank."""
        return "collective" if self._collective is not None else "p2p"

    # ----- step timing, parameters to re-synchronise ------------------------------------
    def track_parameters(self, params: Iterable[torch.Tensor]) -> None:
        """The tensors (a model's parameters) copied from a member when this rank is
        re-admitted after a view that left it out; every rank must track the same layout."""
        self._params = [p for p in params]

    @property
    def sync_pending(self) -> bool:
        """A member's parameters arrived at the latest refresh and wait for
        :meth:`apply_sync`."""
        return self._sync_buffers is not None

    def apply_sync(self) -> None:
        """Overwrite the tracked parameters with the member's copy received at the latest
        refresh (no-op when none is pending)."""
        buffers, self._sync_buffers = self._sync_buffers, None
        if buffers is None:
            return
        with torch.no_grad():
            for p, b in zip(self._params, buffers, strict=True):
                p.copy_(b.view_as(p))

    # ----- telemetry refresh -----------------------------------------------------------
    def begin_step(self, apply_sync: bool = True) -> None:
        """Start a training step: refreshes telemetry and the schedule every K steps.

        With ``apply_sync`` a parameter re-synchronisation received at this refresh is
        applied at once (call it when no backward pass is running); the DDP hook passes
        False and applies it at the end of the backward pass.
        """
        now = time.perf_counter()
        if self._step_started is not None:
            self._local_ms.append(max(now - self._step_started - self._comm_s, 0.0) * 1e3)
        self._step_started, self._comm_s = now, 0.0
        if self.step % self.config.refresh_every == 0:
            self.refresh()
            if apply_sync:
                self.apply_sync()
        self.step += 1

    def measure_rtt(self) -> list[float]:
        """Ping-pong RTT (ms) to every peer; ``inf`` when no pong came by the deadline."""
        epoch = self._epoch
        ping_tag = self._tag(_KIND_PING, epoch)
        pong_tag = self._tag(_KIND_PONG, epoch)
        token = torch.zeros(1)
        responders = []
        for peer in self._alive_peers():
            buffer = torch.empty(1)
            try:
                work = dist.irecv(buffer, src=self._global(peer), group=self.group, tag=ping_tag)
            except RuntimeError:
                self._mark_dead(peer)
                continue
            responders.append(
                _PingResponder(work, peer, buffer, pong_tag, self.group, self._global)
            )
        pongs: dict[int, tuple[float, _Pending]] = {}
        for peer in self._alive_peers():
            start = time.perf_counter()
            if not self._post_send(token, peer, ping_tag, payload=False):
                continue
            pending = self._post_recv(torch.empty(1), peer, pong_tag)
            if pending is not None:
                pongs[peer] = (start, pending)
        deadline = time.perf_counter() + self.config.refresh_deadline_s
        rtt = [math.inf] * self.world_size
        rtt[self.rank] = 0.0
        for peer, (start, pending) in pongs.items():
            pending.event.wait(max(deadline - time.perf_counter(), 0.0))
            if pending.ok:
                rtt[peer] = (pending.done_at - start) * 1e3
            elif pending.error is not None:
                self._mark_dead(peer)
            else:
                self._pending_pings.append(pending)
        self._pending_pings.extend(r for r in responders if not r.event.is_set())
        return rtt

    def _latest_row(self, rank: int) -> Telemetry | None:
        key = f"{self._prefix}/latest/{rank}"
        if not self.store.check([key]):
            return None
        try:
            return Telemetry.from_bytes(self.store.get(key), self.world_size)
        except ValueError:
            return None

    def _worth_waiting(self, rank: int, epoch: int) -> bool:
        """Wait for late ``rank`` when its local step time is not much above this rank's
        (and it is its turn after earlier waits in vain)."""
        if self.config.readmit_wait_s <= 0 or epoch < self._readmit_next.get(rank, 0):
            return False
        latest = self._latest_row(rank)
        if latest is None or latest.compute_ms is None or self._compute_ms is None:
            return True
        return latest.compute_ms <= self.config.readmit_ratio * max(self._compute_ms, 1e-3)

    def refresh(self) -> None:
        """Measure and share telemetry, agree on the view, and recompute the schedule."""
        start = time.perf_counter()
        self._prune()
        if self.selector.history_size:
            self.selector.update_weights()
        if self._local_ms:
            self._compute_ms = statistics.median(self._local_ms)
            self._local_ms = []
        rtt = self.measure_rtt()
        availability, host_free, device_free = measure_local(self.device)
        row = Telemetry(
            rank=self.rank,
            availability=availability,
            host_free_gb=host_free,
            device_free_gb=device_free,
            rtt_ms=tuple(rtt),
            weights=tuple(float(w) for w in self.selector.weights),  # type: ignore[arg-type]
            step=self.step,
            timestamp=time.time(),
            compute_ms=self._compute_ms,
            collective_gen=self._collective_gen,
        )
        epoch = self._epoch
        self._epoch += 1
        key = f"{self._prefix}/tele/{epoch}"
        view_key = f"{self._prefix}/view/{epoch}"
        encoded = row.to_bytes().decode()
        self.store.set(f"{key}/{self.rank}", encoded)
        self.store.set(f"{self._prefix}/latest/{self.rank}", encoded)
        rows = {self.rank: row.to_bytes()}
        # wait for the rows of peers that answered the ping in time; take a late peer's
        # row if it is there already
        waiting = [r for r in self._alive_peers() if math.isfinite(rtt[r])]
        for r in self._alive_peers():
            if not math.isfinite(rtt[r]) and self.store.check([f"{key}/{r}"]):
                rows[r] = self.store.get(f"{key}/{r}")
        self._collect(rows, key, view_key, waiting, self.config.refresh_deadline_s)
        # then, bounded, for late peers worth re-admitting (until someone fixes the view)
        late = [r for r in self._alive_peers() if r not in rows and self._worth_waiting(r, epoch)]
        self._collect(rows, key, view_key, list(late), self.config.readmit_wait_s)
        for r in late:  # a wait in vain: try again after 1, 2, 4, ... refreshes
            if r in rows:
                self._readmit_fails.pop(r, None)
                self._readmit_next.pop(r, None)
            else:
                fails = self._readmit_fails.get(r, 0) + 1
                self._readmit_fails[r] = fails
                self._readmit_next[r] = epoch + 2 ** min(fails - 1, 10)
        proposal = json.dumps({str(r): b.decode() for r, b in sorted(rows.items())})
        self.store.compare_set(view_key, "", proposal)
        agreed = json.loads(self.store.get(view_key))
        previous = set(self.view)
        self.view = {
            int(r): Telemetry.from_bytes(b.encode(), self.world_size) for r, b in agreed.items()
        }
        self.views.append(sorted(self.view))
        self._apply_view()
        self._resync(previous, epoch)
        self.stats.refreshes += 1
        self._comm_s += time.perf_counter() - start

    def _collect(
        self, rows: dict[int, bytes], key: str, view_key: str, waiting: list[int], wait_s: float
    ) -> None:
        deadline = time.perf_counter() + wait_s
        while waiting and time.perf_counter() < deadline:
            for r in list(waiting):
                if self.store.check([f"{key}/{r}"]):
                    rows[r] = self.store.get(f"{key}/{r}")
                    waiting.remove(r)
            if waiting:
                if self.store.check([view_key]):
                    return  # another rank fixed the view: waiting longer changes nothing
                time.sleep(0.002)

    def _apply_view(self) -> None:
        self.graph = schedule_from_view(self.view, self.config.k, self.selector.min_latency_ms)
        self.schedules.append({i: list(peers) for i, peers in self.graph.items()})
        self._collective = None
        if self.rank not in self.view:
            self.stats.excluded_epochs += 1
            self.sources, self.targets, self._features = [], [], {}
            return
        self.sources = list(self.graph[self.rank])
        self.targets = [i for i, peers in self.graph.items() if self.rank in peers]
        me = self.view[self.rank]
        candidates = {
            j: PeerFeatures(t.availability, me.rtt_ms[j], t.mem_free_gb)
            for j, t in self.view.items()
            if j != self.rank
        }
        self._features = normalised_terms(candidates, self.selector.min_latency_ms)
        members = sorted(self.view)
        complete = all(len(self.graph[i]) == len(members) - 1 for i in members)
        if self.config.collective and complete and len(members) > 1:
            self._open_collective(members)

    def _open_collective(self, members: list[int]) -> None:
        gen = max(t.collective_gen for t in self.view.values())
        self._collective_gen = max(self._collective_gen, gen)
        key = (tuple(members), gen)
        group = self._subgroups.get(key)
        if group is None:
            name = "_".join(map(str, members))
            prefix = f"{self._prefix}/collective/{name}/{gen}/"
            options = dist.ProcessGroupGloo._Options()
            options._timeout = datetime.timedelta(seconds=self.config.deadline_s)
            options._devices = [dist.ProcessGroupGloo.create_default_device()]
            try:
                group = dist.ProcessGroupGloo(
                    dist.PrefixStore(prefix, self.store),
                    members.index(self.rank),
                    len(members),
                    options,
                )
            except RuntimeError:  # a member did not connect within the deadline
                self._collective_gen = gen + 1
                return
            self._subgroups = {
                k: g for k, g in self._subgroups.items() if k[0] != key[0] or k[1] > gen
            }
            self._subgroups[key] = group
        self._collective = group
        self._collective_members = members

    def _collective_failed(self) -> None:
        self.stats.collective_failures += 1
        self._collective_gen += 1
        self._subgroups = {k: g for k, g in self._subgroups.items() if g is not self._collective}
        self._collective = None

    def _resync(self, previous: set[int], epoch: int) -> None:
        """Send (or receive) parameters to (from) the ranks this view re-admits."""
        current = set(self.view)
        if not previous or not self._params:
            return
        readmitted = sorted(current - previous)
        continuing = sorted(current & previous)
        if self.rank in readmitted:
            self.stats.readmitted += 1
        if not readmitted or not continuing:
            return
        source = continuing[0]
        tag = self._tag(_KIND_SYNC, epoch)
        flat = [p.detach().reshape(-1) for p in self._params]
        if self.rank == source:
            for peer in readmitted:
                for t in flat:
                    buffer = self._pool.take(t.numel(), t.dtype)
                    buffer.copy_(t)
                    if not self._post_send(buffer, peer, tag):
                        self._pool.release(buffer)
                        break
            return
        if self.rank not in readmitted or source in self.stats.dead:
            return
        pending = [self._post_recv(torch.empty_like(t, device="cpu"), source, tag) for t in flat]
        deadline = time.perf_counter() + self.config.deadline_s
        ok = True
        for p in pending:
            if p is None:
                ok = False
                continue
            p.event.wait(max(deadline - time.perf_counter(), 0.0))
            if not p.ok:
                ok = False
                if p.error is not None:
                    self._mark_dead(source)
                else:
                    self._late.append(p)
        if ok:
            self._sync_buffers = [p.buffer for p in pending if p is not None]
            self.stats.resyncs += 1
        else:
            self.stats.resync_failures += 1

    # ----- exchanges -----------------------------------------------------------------
    def exchange(self, tensor: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """Average ``tensor`` with the selected peers' tensors.

        Returns a new tensor, or ``tensor`` itself holding the average with ``inplace``.
        Every rank must call it the same number of times, with tensors of the same shape
        and dtype. Peers whose tensor misses ``deadline_s`` are left out of the average.
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"exchange expects a tensor, got {type(tensor).__name__}")
        if not self.view:
            raise RuntimeError("call begin_step() (or refresh()) before the first exchange")
        if not torch.is_floating_point(tensor):
            raise ValueError(f"exchange averages floating-point tensors, got {tensor.dtype}")
        start = time.perf_counter()
        self._prune()
        tag = self._tag(_KIND_EXCHANGE, self._calls)
        self._calls += 1
        self.stats.exchanges += 1
        on_cpu = tensor.device.type == "cpu" and tensor.is_contiguous()
        if inplace and on_cpu:
            work = tensor.detach().view(-1)
        else:
            work = tensor.detach().to("cpu", copy=True).contiguous().view(-1)
        own = self._pool.take(work.numel(), work.dtype, uses=1)
        own.copy_(work)  # untouched copy: sent to peers / kept for a redo
        if self._collective is None:
            self._p2p_exchange(own, work, tag, start)
        elif self._collective_exchange(work, start):
            self._pool.release(own)
        else:  # redo point-to-point, with a deadline of its own
            self._p2p_exchange(own, work, tag, time.perf_counter())
        self._comm_s += time.perf_counter() - start
        if inplace and on_cpu:
            return tensor
        result = work.view_as(tensor).to(tensor.device)
        if inplace:
            with torch.no_grad():
                tensor.copy_(result)
            return tensor
        return result

    def _collective_exchange(self, work: torch.Tensor, start: float) -> bool:
        """Subgroup all-reduce of ``work`` in place; False (``work`` undefined) on failure."""
        members = self._collective_members
        try:
            self._collective.allreduce([work]).wait()
        except RuntimeError:
            self._collective_failed()
            return False
        work.div_(len(members))
        n = len(members)
        nbytes = work.numel() * work.element_size()
        self.stats.bytes_sent += int(2 * (n - 1) / n * nbytes)
        self.stats.collective_exchanges += 1
        self.stats.received += n - 1
        self.last_participants = list(members)
        latency_ms = (time.perf_counter() - start) * 1e3
        for peer in self.sources:
            features = self._features.get(peer)
            if features is not None:
                self.selector.record_outcome(f"rank{peer}", features, True, latency_ms, nbytes)
        return True

    def _p2p_exchange(self, own: torch.Tensor, out: torch.Tensor, tag: int, start: float) -> None:
        """Point-to-point average: ``own`` is sent (and released when sent), ``out`` gets
        the average of ``own`` and the peers' tensors that arrived by the deadline."""
        for peer in self.targets:
            if peer not in self.stats.dead:
                self._pool.retain(own)  # released when the send has finished
                if not self._post_send(own, peer, tag):
                    self._pool.release(own)
        pending = {}
        for peer in self.sources:
            if peer not in self.stats.dead:
                buffer = self._pool.take(own.numel(), own.dtype)
                p = self._post_recv(buffer, peer, tag)
                if p is None:
                    self._pool.release(buffer)
                else:
                    pending[peer] = p
        deadline = start + self.config.deadline_s
        nbytes = own.numel() * own.element_size()
        arrived = {self.rank: own}
        for peer, p in pending.items():
            p.event.wait(max(deadline - time.perf_counter(), 0.0))
            ok = p.ok and p.done_at <= deadline
            if ok:
                arrived[peer] = p.buffer
                self.stats.received += 1
            else:
                if p.error is not None:
                    self._mark_dead(peer)
                    self._pool.release(p.buffer)
                else:
                    self.stats.timeouts += 1
                    self._late.append(p)
            latency_ms = (p.done_at - start) * 1e3 if ok else self.config.deadline_s * 1e3
            features = self._features.get(peer)
            if features is not None:
                self.selector.record_outcome(f"rank{peer}", features, ok, latency_ms, nbytes)
        ranks = sorted(arrived)
        self.last_participants = ranks
        if len(ranks) == 1:
            out.copy_(own)
        else:
            torch.add(arrived[ranks[0]], arrived[ranks[1]], out=out)
            for r in ranks[2:]:
                out.add_(arrived[r])
            out.div_(len(ranks))
        for r in ranks:
            self._pool.release(arrived[r])

    def broadcast(self, tensor: torch.Tensor, src: int) -> bool:
        """Copy rank ``src``'s ``tensor`` into every rank's ``tensor`` (in place).

        Returns False (and leaves ``tensor`` unchanged) on a rank where ``src``'s tensor
        missed the deadline or ``src`` is dead.
        """
        if not 0 <= src < self.world_size:
            raise ValueError(f"src must be a rank in [0, {self.world_size}), got {src}")
        self._prune()
        tag = self._tag(_KIND_BROADCAST, self._calls)
        self._calls += 1
        if self.rank == src:
            own = tensor.detach().to("cpu", copy=True).contiguous()
            for peer in self._alive_peers():
                self._post_send(own, peer, tag)
            return True
        if src in self.stats.dead:
            return False
        p = self._post_recv(torch.empty_like(tensor, device="cpu"), src, tag)
        if p is None:
            return False
        p.event.wait(self.config.deadline_s)
        if not p.ok:
            if p.error is not None:
                self._mark_dead(src)
            else:
                self._late.append(p)
            return False
        with torch.no_grad():
            tensor.copy_(p.buffer)
        return True

    def close(self, timeout_s: float | None = None) -> None:
        """Wait (at most ``timeout_s``, default ``deadline_s``) for this rank's posted sends
        to be received, then flush transfer outcomes to the memory."""
        limit = time.perf_counter() + (self.config.deadline_s if timeout_s is None else timeout_s)
        for p in self._sends:
            p.event.wait(max(limit - time.perf_counter(), 0.0))
        self._prune()
        self.selector.update_weights()

    def finish(self, timeout_s: float | None = None) -> list[int]:
        """End of run: :meth:`close`, then wait (store-based, bounded) until every live
        peer has finished too. Returns the ranks that finished (this one included)."""
        self.close(timeout_s)
        key = f"{self._prefix}/finished"
        self.store.set(f"{key}/{self.rank}", "1")
        limit = time.perf_counter() + (
            self.config.refresh_deadline_s if timeout_s is None else timeout_s
        )
        done = {self.rank}
        waiting = self._alive_peers()
        while waiting and time.perf_counter() < limit:
            for r in list(waiting):
                if self.store.check([f"{key}/{r}"]):
                    done.add(r)
                    waiting.remove(r)
            if waiting:
                time.sleep(0.005)
        self._collective = None
        self._subgroups = {}
        return sorted(done)


def memory_aware_hook(state, bucket):  # annotations set below (DDP checks real types)
    """DDP communication hook: average each gradient bucket with the selected peers.

    Register with ``ddp_model.register_comm_hook(exchange, memory_aware_hook)`` (or
    :func:`register_memory_aware_hook`). The first bucket of every backward pass starts a
    step (:meth:`PeerExchange.begin_step`); a parameter re-synchronisation received there
    is applied when the backward pass ends. The average is written into the bucket in
    place. Use ``DistributedDataParallel(..., broadcast_buffers=False)`` when peers may
    fail: DDP's buffer broadcast has no deadline.
    """
    if bucket.index() == 0:
        state.begin_step(apply_sync=False)
        if state.sync_pending:
            torch.autograd.Variable._execution_engine.queue_callback(state.apply_sync)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(state.exchange(bucket.buffer(), inplace=True))
    return fut


memory_aware_hook.__annotations__ = {
    "state": PeerExchange,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def register_memory_aware_hook(
    model: torch.nn.parallel.DistributedDataParallel,
    config: ExchangeConfig | None = None,
    **kwargs: Any,
) -> PeerExchange:
    """Create a :class:`PeerExchange` and register :func:`memory_aware_hook` on ``model``
    (its parameters are re-synchronised when a left-out rank is re-admitted)."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"model must be DistributedDataParallel, got {type(model).__name__}")
    exchange = PeerExchange(config, group=model.process_group, **kwargs)
    exchange.track_parameters(p for p in model.module.parameters() if p.requires_grad)
    model.register_comm_hook(exchange, memory_aware_hook)
    return exchange


class MemoryAwareGroup:
    """Process-group-like wrapper for loops without DDP.

    ``all_reduce(t)`` averages ``t`` in place with the selected peers (op is always the
    average), ``broadcast(t, src)`` copies ``src``'s tensor with a deadline, and
    ``average_gradients(model)`` does one step's exchange of all gradients (flattened into
    one buffer, one exchange per call).
    """

    def __init__(self, config: ExchangeConfig | None = None, **kwargs: Any) -> None:
        self.exchange = PeerExchange(config, **kwargs)

    @property
    def stats(self) -> ExchangeStats:
        return self.exchange.stats

    def begin_step(self) -> None:
        self.exchange.begin_step()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average ``tensor`` in place with the selected peers; returns it."""
        return self.exchange.exchange(tensor, inplace=True)

    def broadcast(self, tensor: torch.Tensor, src: int) -> bool:
        return self.exchange.broadcast(tensor, src)

    def average_gradients(self, model: torch.nn.Module) -> None:
        """Start a step and average every parameter gradient with the selected peers.

        Call it after the backward pass, before the optimiser step. Parameters without a
        gradient contribute zeros (every rank sends the same layout). When this rank is
        re-admitted after a view that left it out, its parameters are first replaced by a
        member's.
        """
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("average_gradients: the model has no trainable parameters")
        if len(params) != len(self.exchange._params) or any(
            a is not b for a, b in zip(params, self.exchange._params, strict=False)
        ):
            self.exchange.track_parameters(params)
        self.begin_step()
        flat = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                for p in params
            ]
        )
        averaged = self.exchange.exchange(flat, inplace=True)
        offset = 0
        for p in params:
            n = p.numel()
            chunk = averaged[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)
            offset += n

    def finish(self, timeout_s: float | None = None) -> list[int]:
        return self.exchange.finish(timeout_s)
