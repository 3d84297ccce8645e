"""``train.py distributed=p2p``: decentralized training over Lattica (no rendezvous server).

    python train.py distributed=p2p                       # 3 peers on this machine
    SEDMA_P2P_GROUP_KEY=<hex> python train.py distributed=p2p \\
        distributed.bootstrap=/ip4/<host>/tcp/<port>/p2p/<id> distributed.peers=1  # join

Every peer is its own process and its own Lattica node (a :class:`TensorPeer`). The first
peer starts the DHT; the others are given its address (``distributed.bootstrap``) and find
everyone else through the DHT. There is no torchrun, no store and no fixed world size.

Averaging: local SGD / DiLoCo-style parameter averaging. Every peer trains
``local_steps`` (H) optimiser steps on its own shard, then a round: it publishes its
parameter vector by content id (:meth:`TensorPeer.publish`), posts a signed round record
(its peer id and CID) in the DHT, waits at most ``round_timeout_s`` for the records of the
peers it saw in the previous round, ranks the peers that posted by Eq. 7 (availability and
free memory from the telemetry every peer publishes in the DHT, Lattica's RTT), fetches
the CIDs of the top ``k`` (each fetch looks up the CID's providers in the DHT and ranks
them by Eq. 7 again) and replaces its parameters by the mean of its own and the fetched
vectors (float64 sum in CID order, so peers that average the same set get the same
bytes, hence the same CID: the round's result has several providers). It then posts a
signed head record (round, CID of the average). Why parameters every H steps rather than
gradients every step: H times fewer rounds over links that are slower than a step, and a
round that misses a peer only averages over fewer vectors; a peer that joins, leaves or
dies costs at most one ``round_timeout_s`` wait and never a collective that blocks.
Optimiser (Adam) state stays local, as in local SGD. Only the digital phase is trained.

Membership: a peer is a member when its records, or its requests, carry a valid HMAC of
the group key (``SEDMA_P2P_GROUP_KEY``, hex; the launcher makes one and writes it to
``<run dir>/p2p_group_key``, mode 0600; requests: ``TensorPeer(admit_key_holders=True)``,
so a peer whose announcement the DHT lost is admitted by those it contacts). Records
without one are dropped (counted in ``rejected_records``), and :class:`TensorPeer`
serves to and fetches from members only, with its own size and CID checks. Nothing is
unpickled.

Churn: a joining peer (``bootstrap`` given) reads the head records, takes the latest round
and fetches that round's average by content id from its best-ranked providers, then
trains from the next round. A killed peer stops posting; the others wait for it at most
one ``round_timeout_s``, then stop expecting it; a record it posted before dying whose
CID cannot be fetched costs at most ``request_timeout_s`` per provider (the next ranked
peer is tried). Every wait is bounded by a deadline and every loop by a count, and so is
every DHT lookup (:class:`TensorPeer` gives each ``request_timeout_s``).

DHT misses: Lattica's subkey index can lose a record when peers post under one key at
once (three peers storing under one key at the same moment lost a subkey in 40 of 40
tries), and a lookup can time out on a loaded machine. So while a round waits, a peer
that it expects (it averaged with it last round; in the first round, every member known
so far) but whose record the DHT has not shown is asked for it directly, every
``ASK_EVERY_S`` (the answer is checked like a DHT record: group HMAC, signer = author);
a fetch whose provider lookup comes back empty asks the record's author; the end-of-run
wait asks for the heads it waits for. An expected peer whose record does not come in
time but that answers the asks is alive and only late (a survivor of a kill may have
spent the round on the dead peer's fetches): it stays expected. Without this one missed
record made a peer expect nobody in the next round, and it could train alone from then
on. A fetch that fails without any answer (a killed provider) is not tried again in the
round; one that was refused (the provider may not have admitted this peer yet) is.

Identity and memory: each peer keeps its libp2p key in ``<state_dir>/peer<i>/`` (default
``<run dir>/p2p_state``; joiners ``peer-1``, ...) and, with ``memory.enabled``, its own
long-term memory there (``memory.db``, SQLite; ``memory.url`` is not used: one store per
peer identity). A peer started again with the same ``state_dir`` has the same peer id
and continues its Eq. 8 transfer history and weights (``weights_at_start`` in its
report); a new ``state_dir`` starts from the prior weights.

Results: ``<run dir>/peers/peer<i>.json`` per peer (rounds, selections, counters, final
accuracy) and ``results.json`` with all of them under ``distributed``.
"""

from __future__ import annotations

import faulthandler
import hashlib
import hmac
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

if TYPE_CHECKING:
    from .memory_setup import ExperimentMemory

__all__ = ["P2P_KEY_ENV", "p2p_settings", "run_peer", "run_train_p2p"]

FETCH_PASSES = 10
ASK_EVERY_S = 1.0
"""While a round waits, a record the DHT has not shown is asked from its author every
ASK_EVERY_S seconds (the first time ASK_EVERY_S after the wait began)."""
KEEP_ROUNDS = 4
"""A peer serves its vectors of the last KEEP_ROUNDS rounds (a slower peer may fetch them)."""
FETCH_WINDOW_S = 5.0
P2P_KEY_ENV = "SEDMA_P2P_GROUP_KEY"
"""Environment variable holding the group key (hex) of a p2p training group."""

_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "mode": "p2p",
    "peers": 3,
    "bootstrap": None,
    "host": "127.0.0.1",
    "group": "sedma-digits",
    "rounds": 10,
    "local_steps": 20,
    "k": 2,
    "shards": 3,
    "shard": None,
    "round_timeout_s": 20.0,
    "join_timeout_s": 30.0,
    "request_timeout_s": 5,
    "telemetry_ttl_s": 60.0,
    "threads_per_peer": 1,
    "launch_timeout_s": 1800.0,
    "record_ttl_s": 600.0,
    "state_dir": None,
}


def p2p_settings(dist_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``distributed`` group of a p2p run with defaults filled in, validated."""
    unknown = set(dist_cfg) - set(_DEFAULTS)
    if unknown:
        raise ValueError(
            f"distributed (p2p): unknown key(s) {sorted(unknown)}; known: {', '.join(_DEFAULTS)}"
        )
    s = {**_DEFAULTS, **{k: v for k, v in dist_cfg.items() if v is not None or k == "shard"}}
    state = s["state_dir"]
    if state is not None and (not isinstance(state, str) or not state.strip()):
        raise ValueError(f"distributed.state_dir must be null or a folder path, got {state!r}")
    for key in ("peers", "rounds", "local_steps", "k", "shards", "request_timeout_s"):
        v = s[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"distributed.{key} must be an integer >= 1, got {v!r}")
    if s["threads_per_peer"] is not None:
        v = s["threads_per_peer"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"distributed.threads_per_peer must be an integer >= 1, got {v!r}")
    for key in (
        "round_timeout_s",
        "join_timeout_s",
        "telemetry_ttl_s",
        "launch_timeout_s",
        "record_ttl_s",
    ):
        v = s[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < math.inf:
            raise ValueError(f"distributed.{key} must be a number > 0, got {v!r}")
    shard = s["shard"]
    if shard is not None and (
        isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < s["shards"]
    ):
        raise ValueError(f"distributed.shard must be null or in [0, shards), got {shard!r}")
    boot = s["bootstrap"]
    if boot is not None and (not isinstance(boot, str) or "/p2p/" not in boot):
        raise ValueError(
            f"distributed.bootstrap must be a multiaddr /ip4/<host>/tcp/<port>/p2p/<peer id>, "
            f"got {boot!r}"
        )
    if not isinstance(s["group"], str) or not s["group"]:
        raise ValueError(f"distributed.group must be a non-empty name, got {s['group']!r}")
    return s


# ----- signed DHT records --------------------------------------------------------------
def _record_key(group_key: bytes) -> bytes:
    return hmac.new(group_key, b"sedma/p2p/train/record/v1", hashlib.sha256).digest()


def encode_record(group_key: bytes, body: Mapping[str, Any]) -> bytes:
    """A round/head record: canonical JSON ``body`` with its group-key HMAC."""
    text = json.dumps(dict(body), sort_keys=True, separators=(",", ":"))
    mac = hmac.new(_record_key(group_key), text.encode(), hashlib.sha256).hexdigest()
    return json.dumps({"body": text, "mac": mac}).encode()


def decode_record(group_key: bytes, raw: bytes, subkey: str) -> dict[str, Any] | None:
    """The body of a record whose HMAC verifies and whose ``peer`` is its subkey, else None."""
    try:
        if len(raw) > 4096:
            return None
        outer = json.loads(raw)
        text = outer["body"]
        mac = hmac.new(_record_key(group_key), text.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(str(outer.get("mac", "")), mac):
            return None
        body = json.loads(text)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict) or body.get("peer") != subkey:
        return None
    return body


class _Group:
    """This peer's view of the group through the DHT's signed records."""

    def __init__(self, peer: Any, group: str, key: bytes, ttl_s: float) -> None:
        self.peer, self.group, self.key, self.ttl_s = peer, group, key, ttl_s
        self.rejected = 0

    def post(self, name: str, body: Mapping[str, Any]) -> None:
        raw = encode_record(self.key, {**body, "peer": self.peer.peer_id, "group": self.group})
        try:
            self.peer.store_record(f"sedma/p2p/{self.group}/{name}", raw, time.time() + self.ttl_s)
        except Exception as exc:  # no peer reachable yet, record store full
            print(f"p2p: record {name} not stored ({exc})", file=sys.stderr, flush=True)

    def read(self, name: str, ask: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
        """Verified records under ``name`` by peer id (this peer's included); members are
        admitted to the :class:`TensorPeer` group on the way. ``ask``: members whose record
        is asked from them directly when the DHT lacks it (verified the same way)."""
        try:
            raw = self.peer.get_records(f"sedma/p2p/{self.group}/{name}", ask=ask)
        except Exception:
            return {}
        out = {}
        for sub, (value, _expiry) in raw.items():
            body = decode_record(self.key, value, sub)
            if body is None or body.get("group") != self.group:
                self.rejected += 1
                continue
            out[sub] = body
        self.peer.add_members(out)
        return out


# ----- one peer ------------------------------------------------------------------------
def _vector(model: nn.Module) -> torch.Tensor:
    return nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def _set_vector(model: nn.Module, vec: torch.Tensor) -> None:
    with torch.no_grad():
        nn.utils.vector_to_parameters(vec.to(torch.float32), model.parameters())


def average(vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean of ``vectors`` (CID -> tensor): float64 sum in CID order, cast back to float32,
    so that every peer averaging the same set gets the same bytes."""
    total = torch.zeros_like(next(iter(vectors.values())), dtype=torch.float64)
    for cid in sorted(vectors):
        total += vectors[cid].to(torch.float64)
    return (total / len(vectors)).to(torch.float32)


def _batches(dataset, batch_size: int, seed: int):
    """Endless shuffled batches of ``dataset`` (epoch ``e`` shuffled by ``seed + e``)."""
    for epoch in range(10**9):
        gen = torch.Generator().manual_seed(seed + epoch)
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen)


def run_peer(
    cfg: Mapping[str, Any],
    *,
    index: int,
    run_dir: str | Path,
    group_key: bytes,
    bootstrap: str | None,
    late: bool = False,
    expected_peers: int = 1,
) -> dict[str, Any]:
    """Train one peer (see the module docstring); writes ``peers/peer<index>.json``."""
    from ..distributed import TensorPeer
    from .builders import build_model, seed_everything
    from .classification import evaluate_classification
    from .compare import write_json
    from .training import _train_data

    s = p2p_settings(cfg["distributed"])
    folder = Path(run_dir) / "peers"
    folder.mkdir(parents=True, exist_ok=True)
    state = Path(s["state_dir"] or Path(run_dir) / "p2p_state").expanduser() / f"peer{index}"
    torch.set_num_threads(int(s["threads_per_peer"]))
    seed = int(cfg.get("seed", 0))
    seed_everything(seed)  # the same initial parameters on every peer
    model = build_model(cfg["model"], for_training=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(cfg["train"]["lr"]))
    train_set, test_set = _train_data(cfg["dataset"])
    memory = _peer_memory(cfg.get("memory"), state)
    peer = TensorPeer(
        host=s["host"],
        bootstrap=[bootstrap] if bootstrap else [],
        group_key=group_key,
        k=max(1, int(s["k"])),
        cache_mb=16.0,
        telemetry_ttl_s=float(s["telemetry_ttl_s"]),
        request_timeout_s=int(s["request_timeout_s"]),
        bitswap=False,
        key_path=state,
        memory=memory.long_term,
        admit_key_holders=True,
    )
    (folder / f"peer{index}.addr").write_text(peer.address + "\n")
    shard = s["shard"]
    if shard is None:
        shard = index % s["shards"] if index >= 0 else int(peer.peer_id.encode().hex(), 16)
        shard %= s["shards"]
    shard_set = Subset(train_set, list(range(shard, len(train_set), s["shards"])))
    batches = _batches(shard_set, int(cfg["train"]["batch_size"]), seed * 1000 + shard)
    group = _Group(peer, s["group"], group_key, float(s["record_ttl_s"]))
    report: dict[str, Any] = {
        "index": index,
        "peer_id": peer.peer_id,
        "address": peer.address,
        "shard": shard,
        "rounds": [],
        "joined_at_round": 0,
        "state_dir": str(state),
        "memory": memory.store,
        "weights_at_start": peer.selector.weights.tolist(),
        "history_at_start": peer.selector.history_size,
    }
    peer.publish_telemetry()
    group.post("members", {"joined": time.time()})
    start_round = 0
    expected: set[str] = set()
    # peers none of whose fetches succeeded in a round (killed, gone): left out until they
    # post a record issued after the one that failed (their clock, so no skew matters);
    # a dead peer's records can outlive it in the DHT (and in this node's record store)
    down: dict[str, float] = {}
    served: list[tuple[str, str]] = []
    if late:
        size = sum(p.numel() for p in model.parameters())
        start_round, expected, join = _join(peer, group, s, size)
        report["join"] = join
        report["joined_at_round"] = start_round
    if report.get("join", {}).get("cid"):
        _set_vector(model, report["join"]["vector"])
        report["join"].pop("vector")
    loss_fn = nn.functional.cross_entropy
    for r in range(start_round, int(s["rounds"])):
        group.read("members")  # admit the peers that announced themselves
        model.train()
        t0 = time.perf_counter()
        losses = []
        for _ in range(int(s["local_steps"])):
            x, y = next(batches)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        own = _vector(model)
        cid = peer.publish(own)
        peer.publish_telemetry()
        mine = {"round": r, "cid": cid, "issued": time.time()}
        group.post(f"round/{r}", mine)
        first = r == start_round and not expected
        need = max(expected_peers if first else 0, len(expected) + 1)
        # the first round waits for the peers started with this one (start-up takes a
        # while on a loaded machine) up to join_timeout_s, later rounds round_timeout_s
        wait = s["join_timeout_s"] if first and expected_peers > 1 else s["round_timeout_s"]
        deadline = time.monotonic() + float(wait)
        waiting_since = time.monotonic()
        records: dict[str, dict[str, Any]] = {}
        next_ask = time.monotonic() + ASK_EVERY_S
        for _ in range(100_000):  # bounded by the deadline too
            ask: list[str] = []
            if time.monotonic() >= next_ask:  # missed by the DHT, or not posted yet
                # the first round asks every member known so far: announced, or admitted
                # by a request (whose announcement the DHT may have lost)
                known = expected | peer.members if first else expected
                ask = sorted(known - set(records) - {peer.peer_id})
                next_ask = time.monotonic() + ASK_EVERY_S
            for p, b in group.read(f"round/{r}", ask=ask).items():  # kept once seen
                if p != peer.peer_id and _issued(b) > down.get(p, -math.inf):
                    records[p] = b
            if expected <= set(records) and len(records) + 1 >= need:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        wait_s = time.perf_counter() - t1
        # an expected peer whose record did not come but that answered the asks is alive
        # and late (it may have paid for a dead peer's fetches): it stays expected
        behind = {p for p in expected - set(records) if peer.answered_since(p, waiting_since)}
        candidates = peer.peer_features(sorted(records))
        ranked = peer.selector.select(candidates, len(candidates))
        ranked += [p for p in sorted(records) if p not in ranked]
        vectors = {cid: own}
        chosen: list[str] = []
        failed: list[str] = []
        retry = list(ranked)
        # fetch from the best-ranked until k delivered; a peer that refused us may not have
        # read our record yet (membership), so more passes for those after a short pause,
        # until the round's deadline (at least FETCH_WINDOW_S; bounded: FETCH_PASSES x
        # len(ranked)); a peer that did not answer at all (killed) is not tried again
        fetch_deadline = max(deadline, time.monotonic() + FETCH_WINDOW_S)
        for attempt in range(FETCH_PASSES):
            done_fetching = not retry or len(chosen) >= s["k"]
            if attempt and (done_fetching or time.monotonic() > fetch_deadline):
                break
            if attempt:
                time.sleep(0.5)
            todo, retry = [p for p in retry if p not in chosen], []
            for p in todo:
                if len(chosen) >= s["k"]:
                    break
                other = records[p].get("cid")
                if not isinstance(other, str):
                    continue
                asked_at = time.monotonic()
                try:  # its author is asked when no provider from the DHT delivers
                    vec = peer.fetch(other, shape=tuple(own.shape), dtype=own.dtype, ask=[p])
                except (LookupError, ValueError):
                    vec = None
                    if peer.answered_since(p, asked_at):  # refused: may not know us yet
                        retry.append(p)
                if vec is None or not torch.isfinite(vec).all():
                    if p not in failed:
                        failed.append(p)
                    continue
                vectors[other] = vec
                chosen.append(p)
                if p in failed:
                    failed.remove(p)
        avg = average(vectors)
        _set_vector(model, avg)
        head = peer.publish(avg)
        group.post("head", {"round": r, "cid": head, "issued": time.time()})
        served.append((cid, head))
        if len(served) > KEEP_ROUNDS:  # bounded memory: older rounds are no longer served
            kept = {c for pair in served[1:] for c in pair}
            for old in served.pop(0):
                if old not in kept:
                    peer.unpublish(old)
        peer.selector.update_weights()
        for p in failed:
            down[p] = _issued(records[p])
        for p in chosen:
            down.pop(p, None)
        # who posted this round is waited for next round (at most round_timeout_s), and
        # so is who is only late
        expected = (set(records) - set(failed)) | behind
        row = {
            "round": r,
            "loss": sum(losses) / len(losses),
            "posted": sorted(records),
            "ranked": ranked,
            "chosen": chosen,
            "failed": failed,
            "cid": cid,
            "head": head,
            "train_s": train_s,
            "wait_s": wait_s,
            "round_s": time.perf_counter() - t1,
        }
        report["rounds"].append(row)
        (folder / f"peer{index}.round").write_text(f"{r}\n")
        print(
            f"p2p peer {index}: round {r} loss {row['loss']:.4f} averaged with "
            f"{len(chosen)} of {len(records)} ({row['round_s']:.2f} s)",
            flush=True,
        )
    # serve the last round a little longer: until the peers of the last round posted their
    # head for it (then nobody needs this peer's vectors any more), at most round_timeout_s
    if report["rounds"]:
        last = report["rounds"][-1]["round"]
        deadline = time.monotonic() + float(s["round_timeout_s"])
        done: set[str] = set()
        next_ask = time.monotonic() + ASK_EVERY_S
        for _ in range(100_000):
            ask = []
            if time.monotonic() >= next_ask:
                ask, next_ask = sorted(expected - done), time.monotonic() + ASK_EVERY_S
            heads = group.read("head", ask=ask)
            done |= {p for p, b in heads.items() if b.get("round", -1) >= last}
            if expected <= done or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    result = evaluate_classification(model, test_set, batch_size=512, progress=False, ks=(1,))
    report["top1"] = float(result.metrics["top1"])
    report["weights"] = peer.selector.weights.tolist()
    report["rejected_records"] = group.rejected
    report["stats"] = dict(vars(peer.stats))
    report["cache"] = {"hits": peer.stats.cache_hits, "fetched": peer.stats.fetched}
    torch.save(model.state_dict(), folder / f"peer{index}.pt")
    write_json(folder / f"peer{index}.json", report)
    peer.close()
    memory.close()
    return report


def _peer_memory(memory_cfg: Mapping[str, Any] | None, state: Path) -> ExperimentMemory:
    """This peer's own long-term memory: the ``memory`` group's settings on a SQLite file
    in its state folder (see the module docstring); no store with ``memory.enabled``
    false."""
    from .memory_setup import open_memory

    if not memory_cfg or not memory_cfg.get("enabled", True):
        return open_memory(memory_cfg)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    return open_memory({**memory_cfg, "url": str(state / "memory.db")})


def _issued(record: Mapping[str, Any]) -> float:
    value = record.get("issued")
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else -math.inf


def _join(peer: Any, group: _Group, s: Mapping[str, Any], size: int) -> tuple[int, set[str], dict]:
    """A late peer: the latest round's average by content id (see the module docstring)."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + float(s["join_timeout_s"])
    heads: dict[str, dict[str, Any]] = {}
    for _ in range(100_000):
        heads = {p: b for p, b in group.read("head").items() if p != peer.peer_id}
        if heads or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not heads:
        return 0, set(), {"round": None, "cid": None, "seconds": time.perf_counter() - t0}
    latest = max(int(b.get("round", -1)) for b in heads.values())
    at_latest = {p: b for p, b in heads.items() if b.get("round") == latest}
    by_cid: dict[str, int] = {}
    for b in at_latest.values():
        by_cid[str(b.get("cid"))] = by_cid.get(str(b.get("cid")), 0) + 1
    # most provided first; the providers may not have admitted this peer yet (they read
    # its announcement once per round), so retry until join_timeout_s (bounded count)
    order = sorted(by_cid, key=lambda c: (-by_cid[c], c))
    for attempt, cid in enumerate(order * FETCH_PASSES):
        if attempt >= len(order) and time.monotonic() > deadline + FETCH_WINDOW_S:
            break
        if attempt and attempt % len(order) == 0:
            time.sleep(0.5)
        providers = peer.providers(cid)
        authors = sorted(p for p, b in at_latest.items() if b.get("cid") == cid)
        try:
            vec = peer.fetch(cid, shape=(size,), dtype=torch.float32, ask=authors)
        except (LookupError, ValueError):
            continue
        if not torch.isfinite(vec).all():
            continue
        return (
            latest + 1,
            set(at_latest),
            {
                "round": latest,
                "cid": cid,
                "providers": sorted(providers),
                "ranked": list(peer.rank_providers(cid)),
                "seconds": time.perf_counter() - t0,
                "vector": vec,
            },
        )
    return 0, set(), {"round": latest, "cid": None, "seconds": time.perf_counter() - t0}


# ----- the launcher --------------------------------------------------------------------
def _group_key(run_dir: Path, joining: bool) -> bytes:
    text = os.environ.get(P2P_KEY_ENV)
    if text:
        try:
            key = bytes.fromhex(text.strip())
        except ValueError as exc:
            raise ValueError(f"{P2P_KEY_ENV} must be hex, got {len(text)} characters") from exc
        if len(key) < 16:
            raise ValueError(f"{P2P_KEY_ENV} must hold at least 16 bytes (32 hex digits)")
        return key
    if joining:
        raise ValueError(
            f"distributed.bootstrap is set: joining a group needs its key in {P2P_KEY_ENV} "
            "(hex; the first peer's run folder holds it in p2p_group_key)"
        )
    key = secrets.token_bytes(32)
    path = run_dir / "p2p_group_key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def run_train_p2p(cfg: Mapping[str, Any], run_dir: str | Path, *, rram_label: str = "") -> dict:
    """Start ``distributed.peers`` peer processes, wait for them (bounded), write
    ``results.json``; returns its payload."""
    from .compare import write_json

    s = p2p_settings(cfg["distributed"])
    run_dir = Path(run_dir)
    folder = run_dir / "peers"
    folder.mkdir(parents=True, exist_ok=True)
    joining = s["bootstrap"] is not None
    key = _group_key(run_dir, joining)
    env = {**os.environ, P2P_KEY_ENV: key.hex(), "PYTHONUNBUFFERED": "1"}
    env.setdefault("RUST_LOG", "off")  # Lattica logs every failed dial with a backtrace
    procs: list[subprocess.Popen] = []
    logs = []
    bootstrap = s["bootstrap"]
    n = int(s["peers"])
    deadline = time.monotonic() + float(s["launch_timeout_s"])
    try:
        for i in range(n):
            spec = {
                "cfg": dict(cfg),
                "index": i if not joining else -1 - i,
                "run_dir": str(run_dir),
                "bootstrap": bootstrap,
                "late": joining,
                "expected_peers": 1 if joining else n,
            }
            log = open(folder / f"peer{i}.log", "w")  # noqa: SIM115 - closed below
            logs.append(log)
            proc = subprocess.Popen(
                [sys.executable, "-m", "sedma_torch.experiments.p2p_train"],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                text=True,
            )
            proc.stdin.write(json.dumps(spec, default=str))
            proc.stdin.close()
            procs.append(proc)
            (folder / f"peer{i}.pid").write_text(f"{proc.pid}\n")
            if bootstrap is not None:  # the others start together once the first listens
                continue
            addr_file = folder / f"peer{spec['index']}.addr"
            limit = time.monotonic() + float(s["join_timeout_s"]) + 60.0
            while not addr_file.is_file() and proc.poll() is None and time.monotonic() < limit:
                time.sleep(0.05)
            if not addr_file.is_file():
                raise RuntimeError(f"p2p: peer {i} did not start (see {folder / f'peer{i}.log'})")
            if bootstrap is None:
                bootstrap = addr_file.read_text().strip()
                (run_dir / "p2p_bootstrap.txt").write_text(bootstrap + "\n")
                print(
                    f"p2p: bootstrap address {bootstrap}\n  join from another machine: "
                    f"{P2P_KEY_ENV}=$(cat {run_dir / 'p2p_group_key'}) python train.py "
                    f"distributed=p2p distributed.bootstrap={bootstrap} distributed.peers=1",
                    flush=True,
                )
        for proc in procs:
            left = max(0.0, deadline - time.monotonic())
            try:
                proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    peers = []
    for i, proc in enumerate(procs):
        index = i if not joining else -1 - i
        path = folder / f"peer{index}.json"
        row = json.loads(path.read_text()) if path.is_file() else {"index": index}
        addr = folder / f"peer{index}.addr"
        if "peer_id" not in row and addr.is_file():  # a lost peer: who it was
            row["address"] = addr.read_text().strip()
            row["peer_id"] = row["address"].rsplit("/", 1)[-1]
        row["exit_code"] = proc.returncode
        peers.append(row)
    finished = [p for p in peers if p["exit_code"] == 0 and "top1" in p]
    payload = {
        "distributed": {
            "mode": "p2p",
            "peers": peers,
            "finished": [p["index"] for p in finished],
            "lost": [p["index"] for p in peers if p not in finished],
            "rounds": int(s["rounds"]),
            "local_steps": int(s["local_steps"]),
            "k": int(s["k"]),
            "selections": {
                str(p["index"]): [
                    {"round": r["round"], "chosen": r["chosen"], "ranked": r["ranked"]}
                    for r in p.get("rounds", [])
                ]
                for p in peers
            },
        },
        "top1": [p.get("top1") for p in peers],
    }
    write_json(run_dir / "results.json", payload)
    if not finished:
        raise RuntimeError(f"p2p: no peer finished (logs: {folder})")
    print(
        "p2p: "
        + "; ".join(
            f"peer {p['index']}: top1 {p['top1']:.3f}"
            if "top1" in p
            else f"peer {p['index']}: lost"
            for p in peers
        ),
        flush=True,
    )
    return payload


def _main() -> None:
    # ``kill -USR1 <pid>`` writes every thread's stack to the peer's log (a peer that hangs
    # in a network call can be looked at without stopping it)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    spec = json.loads(sys.stdin.read())
    key = bytes.fromhex(os.environ[P2P_KEY_ENV])
    run_peer(
        spec["cfg"],
        index=int(spec["index"]),
        run_dir=spec["run_dir"],
        group_key=key,
        bootstrap=spec["bootstrap"],
        late=bool(spec["late"]),
        expected_peers=int(spec["expected_peers"]),
    )


if __name__ == "__main__":
    _main()
