"""Eq. 8-9 across a restart: a :class:`PeerSelector` built again on the same long-term
memory (SQLite file) reads its weights and transfer history back and continues the
adaptation from them; checked against an independent NumPy recomputation of Eq. 8-9
from the history stored in the database."""

from __future__ import annotations

import numpy as np

from sedma_torch.distributed import PeerSelector
from sedma_torch.memory import LongTermMemory

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
