"""Memory-aware gradient exchange on torch.distributed: DDP comm hook and group wrapper.

How an exchange works
---------------------
Every ``refresh_every`` steps each rank measures its telemetry (availability, free memory,
a ping-pong RTT to every peer over the process group), publishes it as JSON in the
process group's key/value store and waits up to ``refresh_deadline_s`` for the rows of
the peers that answered its ping in time (within ``refresh_deadline_s``; a rank that did
not is late, and its row is taken only if it is already there). The first rank done
waiting fixes the *view* of the epoch (the rows it has) with an
atomic ``store.compare_set``; every rank then reads the same view, so every rank derives
the same schedule: for each member ``i`` the top ``k`` peers by the Eq. 7 score computed
from ``i``'s own row (its RTTs, its weights) and the others' availability and free
memory. ``i`` averages its tensor with the tensors of the peers it selected; a peer
sends its tensor to every rank that selected it. All transfers of one exchange are
posted at once (``isend``/``irecv``, tag = exchange number), so no ordering can
deadlock; each rank waits at most ``deadline_s`` and averages what arrived: its own
tensor plus the arrived ones, summed in rank order and divided by their count. With
every peer selected (``k=None``) and nobody late the result is the all-reduce average on
every rank (the same sum in the same order, so bit-identical across ranks).

Deadlines on gloo, and their limits
-----------------------------------
gloo cannot cancel a posted operation, and ``work.wait(timeout)`` closes the pair for good
when it expires (measured here: "Application timeout caused pair closure"), and
``is_completed()`` does not progress without ``wait``. So every posted operation is waited
on, without a timeout, by a small daemon thread, and the caller waits on that thread's
event with the deadline. A late tensor still arrives later into its own buffer and is
counted in ``stats.late_arrivals`` and discarded (it never enters a later average,
because every exchange has its own tag). A peer whose transfer fails (a killed process
closes its sockets: "Connection closed by peer") or exceeds the process group's own
timeout is marked dead and skipped from then on; at the next refresh it publishes no row,
so it leaves the view of every rank. The store must outlive the workers: with
``torchrun`` it lives in the elastic agent, but torchrun's agent stops every worker when
one fails (its restart policy), so surviving a killed worker needs a launcher that keeps
the others running (e.g. :func:`sedma_torch.distributed.spawn`, whose parent hosts the
store). DDP itself runs collectives that have no deadline: the parameter broadcast at
construction, the bucket rebuild after the first iteration, and the buffer broadcast of
every forward pass unless ``broadcast_buffers=False``, which fault tolerance needs.
The exchange needs a gloo group; a CUDA tensor is copied to the CPU for it (NCCL's
waits do not honour deadlines).

A rank that reaches a refresh after the view was fixed is left out of that epoch: it
sends and receives nothing and trains on its own gradients, and nobody waits for it
beyond the refresh deadline (paid once per refresh while it is late). A rank that is late
only once rejoins at the next refresh it reaches in time. A persistently slower rank
falls further behind in steps and stays out (it cannot catch up); re-admitting it would
need copying a member's parameters and step count, which is not implemented. Its gradients are then lost to the others and its replica drifts: the
benchmark reports that cost (``scripts/bench_exchange.py``).
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
from collections.abc import Mapping
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
_KIND_PING, _KIND_PONG, _KIND_EXCHANGE, _KIND_BROADCAST = 1, 2, 3, 4
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
        for name in ("deadline_s", "refresh_deadline_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
                raise ValueError(f"ExchangeConfig.{name} must be a number > 0, got {value!r}")
        if (
            isinstance(self.refresh_every, bool)
            or not isinstance(self.refresh_every, int)
            or self.refresh_every < 1
        ):
            raise ValueError(
                f"ExchangeConfig.refresh_every must be an integer >= 1, got {self.refresh_every!r}"
            )


@dataclass
class ExchangeStats:
    """Counters of one :class:`PeerExchange` (this rank's view)."""

    exchanges: int = 0
    """Exchange calls."""
    received: int = 0
    """Peer tensors that arrived before the deadline (and were averaged in)."""
    timeouts: int = 0
    """Peer tensors that missed the deadline."""
    late_arrivals: int = 0
    """Of those, how many arrived afterwards (discarded)."""
    bytes_sent: int = 0
    """Payload bytes posted to peers (tensors only, not telemetry)."""
    refreshes: int = 0
    """Telemetry refreshes."""
    excluded_epochs: int = 0
    """Refreshes whose view left this rank out (it then used its own tensor only)."""
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


def schedule_from_view(
    view: Mapping[int, Telemetry], k: int | None, min_latency_ms: float = 1e-3
) -> dict[int, list[int]]:
    """For every member ``i`` of ``view``, the peers it averages with (best first).

    Member ``i`` scores every other member ``j`` with Eq. 7 from ``i``'s RTT to ``j``,
    ``j``'s availability and free memory, and ``i``'s weights, and keeps the top ``k``
    (all when ``k`` is None). A pure function of the view: every rank computes the same.
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
        graph[i] = selector.select(candidates, len(candidates) if k is None else k)
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

    # ----- helpers -------------------------------------------------------------------
    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _tag(self, kind: int, counter: int) -> int:
        instance = (self._instance & 0xFF) << _COUNTER_BITS
        return (kind << _TAG_BITS) | instance | (counter & ((1 << _COUNTER_BITS) - 1))

    def _mark_dead(self, peer: int) -> None:
        self.stats.dead.add(peer)

    def _post_send(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        try:
            work = dist.isend(tensor, dst=self._global(peer), group=self.group, tag=tag)
        except RuntimeError:
            self._mark_dead(peer)
            return
        self._sends.append(_Pending(work, peer, tensor))
        self.stats.bytes_sent += tensor.numel() * tensor.element_size()

    def _post_recv(self, like: torch.Tensor, peer: int, tag: int) -> _Pending | None:
        buffer = torch.empty_like(like)
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
            elif p.error is None:
                self.stats.late_arrivals += 1
            else:
                self._mark_dead(p.peer)
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
            elif p.error is not None:
                self._mark_dead(p.peer)
        self._sends = sends

    def _alive_peers(self) -> list[int]:
        return [r for r in range(self.world_size) if r != self.rank and r not in self.stats.dead]

    # ----- telemetry refresh -----------------------------------------------------------
    def begin_step(self) -> None:
        """Start a training step: refreshes telemetry and the schedule every K steps."""
        if self.step % self.config.refresh_every == 0:
            self.refresh()
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
            try:
                send = dist.isend(token, dst=self._global(peer), group=self.group, tag=ping_tag)
            except RuntimeError:
                self._mark_dead(peer)
                continue
            self._sends.append(_Pending(send, peer, token))
            pending = self._post_recv(token, peer, pong_tag)
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

    def refresh(self) -> None:
        """Measure and share telemetry, agree on the view, and recompute the schedule."""
        self._prune()
        if self.selector.history_size:
            self.selector.update_weights()
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
        )
        epoch = self._epoch
        self._epoch += 1
        key = f"{self._prefix}/tele/{epoch}"
        self.store.set(f"{key}/{self.rank}", row.to_bytes().decode())
        rows = {self.rank: row.to_bytes()}
        # wait only for the rows of peers that answered the ping in time: the others are
        # late (their rows are taken if already there)
        waiting = [r for r in self._alive_peers() if math.isfinite(rtt[r])]
        for r in self._alive_peers():
            if not math.isfinite(rtt[r]) and self.store.check([f"{key}/{r}"]):
                rows[r] = self.store.get(f"{key}/{r}")
        deadline = time.perf_counter() + self.config.refresh_deadline_s
        while waiting and time.perf_counter() < deadline:
            for r in list(waiting):
                if self.store.check([f"{key}/{r}"]):
                    rows[r] = self.store.get(f"{key}/{r}")
                    waiting.remove(r)
            if waiting:
                time.sleep(0.002)
        proposal = json.dumps({str(r): b.decode() for r, b in sorted(rows.items())})
        view_key = f"{self._prefix}/view/{epoch}"
        self.store.compare_set(view_key, "", proposal)
        agreed = json.loads(self.store.get(view_key))
        self.view = {
            int(r): Telemetry.from_bytes(b.encode(), self.world_size) for r, b in agreed.items()
        }
        self._apply_view()
        self.stats.refreshes += 1

    def _apply_view(self) -> None:
        self.graph = schedule_from_view(self.view, self.config.k, self.selector.min_latency_ms)
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

    # ----- exchanges -----------------------------------------------------------------
    def exchange(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average ``tensor`` with the selected peers' tensors (returns a new tensor).

        Every rank must call it the same number of times, with tensors of the same shape
        and dtype. Peers whose tensor misses ``deadline_s`` are left out of the average.
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"exchange expects a tensor, got {type(tensor).__name__}")
        if not self.view:
            raise RuntimeError("call begin_step() (or refresh()) before the first exchange")
        if not torch.is_floating_point(tensor):
            raise ValueError(f"exchange averages floating-point tensors, got {tensor.dtype}")
        self._prune()
        tag = self._tag(_KIND_EXCHANGE, self._calls)
        self._calls += 1
        self.stats.exchanges += 1
        own = tensor.detach().to("cpu", copy=True).contiguous()
        start = time.perf_counter()
        for peer in self.targets:
            if peer not in self.stats.dead:
                self._post_send(own, peer, tag)
        pending = {}
        for peer in self.sources:
            if peer not in self.stats.dead:
                p = self._post_recv(own, peer, tag)
                if p is not None:
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
            elif p.error is not None:
                self._mark_dead(peer)
            else:
                self.stats.timeouts += 1
                self._late.append(p)
            latency_ms = (p.done_at - start) * 1e3 if ok else self.config.deadline_s * 1e3
            features = self._features.get(peer)
            if features is not None:
                self.selector.record_outcome(f"rank{peer}", features, ok, latency_ms, nbytes)
        ranks = sorted(arrived)
        self.last_participants = ranks
        total = arrived[ranks[0]].clone()
        for r in ranks[1:]:
            total += arrived[r]
        total /= len(ranks)
        return total.to(tensor.device)

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
        p = self._post_recv(tensor.detach().to("cpu"), src, tag)
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
        return sorted(done)


def memory_aware_hook(state, bucket):  # annotations set below (DDP checks real types)
    """DDP communication hook: average each gradient bucket with the selected peers.

    Register with ``ddp_model.register_comm_hook(exchange, memory_aware_hook)`` (or
    :func:`register_memory_aware_hook`). The first bucket of every backward pass starts a
    step (:meth:`PeerExchange.begin_step`). Use ``DistributedDataParallel(...,
    broadcast_buffers=False)`` when peers may fail: DDP's buffer broadcast has no deadline.
    """
    if bucket.index() == 0:
        state.begin_step()
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(state.exchange(bucket.buffer()))
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
    """Create a :class:`PeerExchange` and register :func:`memory_aware_hook` on ``model``."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"model must be DistributedDataParallel, got {type(model).__name__}")
    exchange = PeerExchange(config, group=model.process_group, **kwargs)
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
        with torch.no_grad():
            tensor.copy_(self.exchange.exchange(tensor))
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> bool:
        return self.exchange.broadcast(tensor, src)

    def average_gradients(self, model: torch.nn.Module) -> None:
        """Start a step and average every parameter gradient with the selected peers.

        Parameters without a gradient contribute zeros (every rank sends the same layout).
        """
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("average_gradients: the model has no trainable parameters")
        self.begin_step()
        flat = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                for p in params
            ]
        )
        averaged = self.exchange.exchange(flat)
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
