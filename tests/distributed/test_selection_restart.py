"""Eq. 8-9 across a restart: a :class:`PeerSelector` built again on the same long-term
memory (SQLite file) reads its weights and transfer history back and continues the
adaptation from them; checked against an independent NumPy recomputation of Eq. 8-9
from the history stored in the database. Then the same for a real p2p peer
(:class:`TensorPeer` over Lattica): restarted with the same key folder and memory file it
has the same peer id and continues its weights; a new key folder starts from the prior."""

from __future__ import annotations

import os
import stat
import time

import numpy as np
import pytest
import torch

from sedma_torch.distributed import PeerSelector
from sedma_torch.distributed import p2p as p2p_module
from sedma_torch.memory import LongTermMemory

from .p2p_helpers import KEY, needs_lattica, until

ETA, TAU = 0.01, 0.1


def _reference_step(weights: np.ndarray, history: np.ndarray) -> np.ndarray:
    """w + eta * d success_rate / d w with the softmax policy over the history (SPEC Eq. 8-9),
    written out independently of sedma_torch."""
    x, y = history[:, :3], history[:, 3]
    logits = x @ weights / TAU
    pi = np.exp(logits - logits.max())
    pi /= pi.sum()
    grad = (pi @ (x * y[:, None]) - (pi @ x) * (pi @ y)) / TAU
    return np.maximum(weights + ETA * grad, 0.0)


def _transfers(rng: np.random.Generator, n: int) -> list[tuple[np.ndarray, bool]]:
    # the peers strong on the latency term (column 1) complete their transfers
    features = rng.uniform(0, 1, size=(n, 3))
    return [(f, bool(f[1] > 0.5)) for f in features]


def test_restarted_selector_continues_eq8_from_stored_history(tmp_path):
    url = f"sqlite:///{tmp_path / 'ltm.db'}"
    rng = np.random.default_rng(17)
    first = PeerSelector(memory=LongTermMemory(url), name="p2p/peer-a", eta=ETA, temperature=TAU)
    fed = []
    for _ in range(5):
        for i, (x, ok) in enumerate(_transfers(rng, 8)):
            fed.append([*x, float(ok)])
            first.record_outcome(f"peer{i}", x, ok, latency_ms=1.0 + i, nbytes=100)
        first.update_weights()
    before = first.weights.copy()
    assert before[1] > before[0] and before[1] > before[2]  # it learned something
    del first  # the process ends

    memory = LongTermMemory(url)  # a new process opens the same database
    stored = memory.get("peer_selector", "p2p/peer-a")
    history = np.asarray(stored["history"], dtype=np.float64)
    np.testing.assert_array_equal(history, np.asarray(fed))  # stored as recorded
    assert len(memory.transfers(limit=1000)) == 40  # every outcome reached the database
    second = PeerSelector(memory=memory, name="p2p/peer-a", eta=ETA, temperature=TAU)
    np.testing.assert_array_equal(second.weights, before)  # restart changes nothing...
    assert second.history_size == 40

    new = _transfers(rng, 8)
    for i, (x, ok) in enumerate(new):
        second.record_outcome(f"peer{i}", x, ok, latency_ms=2.0, nbytes=100)
    after = second.update_weights()  # ... but continues the adaptation
    full = np.vstack([history, [[*x, float(ok)] for x, ok in new]])
    np.testing.assert_allclose(after, _reference_step(np.asarray(stored["weights"]), full))
    fresh = PeerSelector(eta=ETA, temperature=TAU)  # what a peer without memory would do
    for i, (x, ok) in enumerate(new):
        fresh.record_outcome(f"peer{i}", x, ok, latency_ms=2.0, nbytes=100)
    assert not np.allclose(fresh.update_weights(), after)


def _provider(monkeypatch, bootstrap: str, availability: float) -> p2p_module.TensorPeer:
    """A peer whose telemetry says ``availability`` (so Eq. 7's first term is known)."""
    peer = p2p_module.TensorPeer(bootstrap=[bootstrap], group_key=KEY, cache_mb=0)
    monkeypatch.setattr(p2p_module, "measure_local", lambda: (availability, 8.0, None))
    peer.publish_telemetry()
    return peer


def _open(bootstrap: str, folder, url: str) -> p2p_module.TensorPeer:
    """The peer under test: its key in ``folder``, its long-term memory at ``url``."""
    return p2p_module.TensorPeer(
        bootstrap=[bootstrap],
        group_key=KEY,
        cache_mb=0,
        key_path=folder,
        memory=LongTermMemory(url),
        request_timeout_s=2,
    )


def _exchange_rounds(peer, good: str, bad: str, rounds: int) -> None:
    """``rounds`` x (a fetch the fully available provider completes, a fetch the one with
    no idle CPU fails), then an Eq. 8 step each: every outcome's features are known
    exactly (one candidate per lookup: availability 1 or 0, latency and memory terms 1)."""
    for _ in range(rounds):
        assert peer.fetch(good).shape == (64,)
        with pytest.raises(LookupError):
            peer.fetch(bad)
        peer.selector.update_weights()


@needs_lattica
def test_restarted_p2p_peer_keeps_its_id_and_continues_eq8(tmp_path, monkeypatch):
    hub = p2p_module.TensorPeer(group_key=KEY, cache_mb=0)
    good_peer = _provider(monkeypatch, hub.address, 1.0)
    bad_peer = _provider(monkeypatch, hub.address, 0.0)
    providers = [hub, good_peer, bad_peer]
    opened: list[p2p_module.TensorPeer] = []
    try:
        good = good_peer.publish(torch.randn(64, generator=torch.Generator().manual_seed(1)))
        bad = bad_peer.publish(torch.randn(64, generator=torch.Generator().manual_seed(2)))
        bad_peer._blocks.clear()  # still advertised in the DHT, but it answers not_found
        url = f"sqlite:///{tmp_path / 'a' / 'memory.db'}"
        (tmp_path / "a").mkdir()
        first = _open(hub.address, tmp_path / "a", url)
        opened.append(first)
        for p in providers:
            p.add_members([q.peer_id for q in providers] + [first.peer_id])
        first.add_members([good_peer.peer_id, bad_peer.peer_id])
        assert until(lambda: len(first.peer_telemetry([good_peer.peer_id, bad_peer.peer_id])) == 2)
        assert until(lambda: first.providers(good) and first.providers(bad))
        _exchange_rounds(first, good, bad, rounds=3)
        peer_id, before = first.peer_id, first.selector.weights.copy()
        assert before[0] > 1 / 3 and np.allclose(before[1:], 1 / 3)  # it learned something
        assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(tmp_path / "a" / "p2p.key").st_mode) == 0o600
        first.close()  # the process ends
        first.selector.memory.close()
        time.sleep(0.5)

        # started again: the same key folder, the same memory file
        second = _open(hub.address, tmp_path / "a", url)
        opened.append(second)
        second.add_members([good_peer.peer_id, bad_peer.peer_id])
        assert second.peer_id == peer_id  # the providers serve it without a new admission
        np.testing.assert_array_equal(second.selector.weights, before)  # nothing changed...
        assert second.selector.history_size == 6
        stored = np.asarray(
            second.selector.memory.get("peer_selector", f"p2p/{peer_id}")["history"]
        )
        np.testing.assert_array_equal(stored[:, :3], [[1, 1, 1], [0, 1, 1]] * 3)
        np.testing.assert_array_equal(stored[:, 3], [1, 0] * 3)
        assert until(lambda: len(second.peer_telemetry([good_peer.peer_id, bad_peer.peer_id])) == 2)
        assert until(lambda: second.providers(good) and second.providers(bad))
        _exchange_rounds(second, good, bad, rounds=1)
        new = np.array([[1, 1, 1, 1], [0, 1, 1, 0]], dtype=np.float64)
        # ... but it continues: one step from the stored weights over the whole history,
        # not what a peer starting from the prior with the new transfers alone would learn
        after = second.selector.weights
        np.testing.assert_allclose(after, _reference_step(before, np.vstack([stored, new])))
        assert not np.allclose(after, _reference_step(np.full(3, 1 / 3), new))

        fresh = _open(hub.address, tmp_path / "fresh", url)  # new identity, same memory file
        opened.append(fresh)
        assert fresh.peer_id != peer_id
        np.testing.assert_array_equal(fresh.selector.weights, np.full(3, 1 / 3))  # the prior
        assert fresh.selector.history_size == 0
        # a key that does not load is refused (Lattica would make a new id without a word)
        (tmp_path / "fresh" / "p2p.key").write_bytes(b"not a key")
        with pytest.raises(ValueError, match="did not load"):
            _open(hub.address, tmp_path / "fresh", url)
    finally:
        for p in opened + providers:
            if not p._closed:
                p.close()
        for p in opened:
            p.selector.memory.close()
