"""PeerSelector (Eq. 7-9), telemetry rows and schedules: single-process tests."""

from __future__ import annotations

import math

import numpy as np
import psutil
import pytest

from sedma_torch.distributed import (
    ExchangeConfig,
    InProcessMemory,
    PeerFeatures,
    PeerSelector,
    Telemetry,
    UtilityCache,
    measure_local,
    normalised_terms,
    schedule_from_view,
)


def test_scores_match_hand_computed_eq7():
    candidates = {
        "a": PeerFeatures(availability=0.5, latency_ms=2.0, mem_free_gb=8.0),
        "b": PeerFeatures(availability=1.0, latency_ms=4.0, mem_free_gb=2.0),
        "c": PeerFeatures(availability=0.25, latency_ms=1.0, mem_free_gb=4.0),
    }
    selector = PeerSelector((0.2, 0.5, 0.3))
    # by hand: 1/latency normalised by the best (1 ms): a 0.5, b 0.25, c 1;
    # memory normalised by the largest (8 GB): a 1, b 0.25, c 0.5
    expected = {
        "a": 0.2 * 0.5 + 0.5 * 0.5 + 0.3 * 1.0,
        "b": 0.2 * 1.0 + 0.5 * 0.25 + 0.3 * 0.25,
        "c": 0.2 * 0.25 + 0.5 * 1.0 + 0.3 * 0.5,
    }
    scores = selector.scores(candidates)
    assert scores.keys() == expected.keys()
    for peer, value in expected.items():
        assert scores[peer] == pytest.approx(value, abs=1e-12)
    assert selector.select(candidates, 2) == ["c", "a"]
    assert selector.select(candidates, 0) == []
    assert selector.select(candidates, 10) == ["c", "a", "b"]


def test_unreachable_and_zero_latency_candidates():
    candidates = {
        1: PeerFeatures(1.0, math.inf, 100.0),
        2: PeerFeatures(0.5, 1e-9, 1.0),
        3: PeerFeatures(0.5, 2e-3, 1.0),
    }
    terms = normalised_terms(candidates, min_latency_ms=1e-3)
    assert set(terms) == {2, 3}  # unreachable left out
    np.testing.assert_allclose(terms[2], [0.5, 1.0, 1.0])  # 0 ms raised to the 1 us floor
    np.testing.assert_allclose(terms[3], [0.5, 0.5, 1.0])
    assert PeerSelector().select(candidates, 3) == [2, 3]


def _reference_success_rate(w, x, y, tau):
    logits = x @ w / tau
    p = np.exp(logits - logits.max())
    return float((p / p.sum()) @ y)


def test_weight_update_matches_finite_difference_of_success_rate():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, size=(200, 3))
    y = (rng.uniform(0, 1, 200) < 0.2 + 0.7 * x[:, 1]).astype(float)  # latency term predicts
    memory = InProcessMemory()
    selector = PeerSelector((0.4, 0.3, 0.3), temperature=0.5, memory=memory)
    for i in range(200):
        selector.record_outcome(f"p{i % 4}", x[i], bool(y[i]), 1.0 + i, 1000)
    w0 = np.array([0.4, 0.3, 0.3])
    h = 1e-6
    fd = np.array(
        [
            (
                _reference_success_rate(w0 + h * e, x, y, 0.5)
                - _reference_success_rate(w0 - h * e, x, y, 0.5)
            )
            / (2 * h)
            for e in np.eye(3)
        ]
    )
    np.testing.assert_allclose(selector.success_rate_gradient(), fd, rtol=1e-5, atol=1e-9)
    assert selector.success_rate() == pytest.approx(_reference_success_rate(w0, x, y, 0.5))
    new = selector.update_weights()
    np.testing.assert_allclose(new, np.maximum(w0 + 0.01 * fd, 0), rtol=1e-7)
    assert fd[1] > 0 and new[1] > w0[1]  # the predictive term gains weight
    # outcomes reached the memory; the learned weights are what a new selector starts from
    profile = memory.peer_profile("p1")
    assert profile["attempts"] == 50
    assert profile["successes"] == int(y[1::4].sum())
    assert len(memory.transfers(limit=10_000)) == 200
    again = PeerSelector((1.0, 0.0, 0.0), memory=memory)
    np.testing.assert_allclose(again.weights, new)


def test_selector_rejects_bad_arguments():
    with pytest.raises(ValueError, match="weights"):
        PeerSelector((0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="weights"):
        PeerSelector((1.0, -1.0, 0.5))
    with pytest.raises(ValueError, match="eta"):
        PeerSelector(eta=0.0)
    with pytest.raises(ValueError, match="k must"):
        PeerSelector().select({}, -1)
    with pytest.raises(ValueError, match="latency_ms"):
        PeerFeatures(0.5, 0.0, 1.0)
    with pytest.raises(ValueError, match="availability"):
        PeerFeatures(float("nan"), 1.0, 1.0)
    with pytest.raises(ValueError, match="features"):
        PeerSelector().record_outcome("p", np.zeros(2), True, 1.0, 1)
    with pytest.raises(ValueError, match="deadline_s"):
        ExchangeConfig(deadline_s=0)
    with pytest.raises(ValueError, match="refresh_every"):
        ExchangeConfig(refresh_every=0)
    with pytest.raises(ValueError, match="k must"):
        ExchangeConfig(k=-1)
    with pytest.raises(ValueError, match="readmit_wait_s"):
        ExchangeConfig(readmit_wait_s=-1.0)
    with pytest.raises(ValueError, match="readmit_ratio"):
        ExchangeConfig(readmit_ratio=0.0)
    with pytest.raises(ValueError, match="collective"):
        ExchangeConfig(collective="yes")


def _row(rank, rtt, availability=0.5, mem=4.0, weights=(1 / 3, 1 / 3, 1 / 3)):
    return Telemetry(rank, availability, mem, None, tuple(rtt), weights, 0, 0.0)


def test_telemetry_round_trip_and_validation():
    row = Telemetry(1, 0.25, 3.5, 1.5, (0.2, 0.0, math.inf), (0.1, 0.2, 0.7), 7, 123.5)
    assert Telemetry.from_bytes(row.to_bytes(), 3) == row
    assert row.mem_free_gb == 1.5
    with pytest.raises(ValueError, match="JSON"):
        Telemetry.from_bytes(b"\x80not json", 3)
    with pytest.raises(ValueError, match="rtt_ms"):
        Telemetry.from_bytes(row.to_bytes(), 4)
    bad = row.to_bytes().replace(b'"availability":0.25', b'"availability":1.5')
    with pytest.raises(ValueError, match="availability"):
        Telemetry.from_bytes(bad, 3)
    with pytest.raises(ValueError, match="fields"):
        Telemetry.from_bytes(b'{"rank": 0}', 3)
    timed = Telemetry(0, 0.5, 2.0, None, (0.0, 1.0, 2.0), (0.2, 0.3, 0.5), 3, 1.0, 210.5, 2)
    assert Telemetry.from_bytes(timed.to_bytes(), 3) == timed
    with pytest.raises(ValueError, match="compute_ms"):
        Telemetry.from_bytes(timed.to_bytes().replace(b"210.5", b"-1"), 3)
    with pytest.raises(ValueError, match="collective_gen"):
        Telemetry.from_bytes(
            timed.to_bytes().replace(b'"collective_gen":2', b'"collective_gen":1.5'), 3
        )


def test_schedule_from_view_uses_each_ranks_own_rtt_and_weights():
    view = {
        0: _row(0, [0.0, 0.1, 50.0]),
        1: _row(1, [0.1, 0.0, 0.2]),
        2: _row(2, [50.0, 0.3, 0.0], mem=8.0),
    }
    graph = schedule_from_view(view, k=1)
    # rank 0: rank 1 (0.1 ms) beats rank 2 (50 ms) despite 2's larger memory
    # rank 1: 1 -> 0: 1/3 (0.5 + 1 + 0.5) = 0.667;  1 -> 2: 1/3 (0.5 + 0.5 + 1) = 0.667: tie -> 0
    # rank 2: 2 -> 1 (0.3 ms) vs 2 -> 0 (50 ms), equal memory
    assert graph == {0: [1], 1: [0], 2: [1]}
    assert schedule_from_view(view, k=None) == {0: [1, 2], 1: [0, 2], 2: [1, 0]}
    view[1] = _row(1, [0.1, 0.0, 0.2], weights=(0.0, 0.0, 1.0))  # rank 1 only values memory
    assert schedule_from_view(view, k=1)[1] == [2]


def test_measure_local_reports_host_memory_and_idle_fraction():
    availability, host_free, device_free = measure_local()
    assert 0.0 <= availability <= 1.0
    assert device_free is None
    assert host_free == pytest.approx(psutil.virtual_memory().available / 1e9, rel=0.2)


def test_selector_and_cache_persist_in_the_long_term_memory(tmp_path):
    memory_mod = pytest.importorskip("sedma_torch.memory")
    url = f"sqlite:///{tmp_path / 'ltm.db'}"
    ltm = memory_mod.LongTermMemory(url)
    selector = PeerSelector((0.5, 0.25, 0.25), memory=ltm, name="rank0")
    rng = np.random.default_rng(5)
    outcomes = []
    for i in range(30):
        ok = bool(rng.uniform() < 0.7)
        outcomes.append(ok)
        selector.record_outcome("rank1", rng.uniform(0, 1, 3), ok, 2.0 + i, 4096)
    assert ltm.peer_profile("rank1") is None  # buffered until the refresh
    learned = selector.update_weights()
    cache = UtilityCache(1.0, memory=ltm)
    cache.put("cid-a", b"x" * 1000)
    assert cache.get("cid-a") == b"x" * 1000
    ltm.close()
    reopened = memory_mod.LongTermMemory(url)  # a later run
    profile = reopened.peer_profile("rank1")
    assert profile["attempts"] == 30 and profile["successes"] == sum(outcomes)
    np.testing.assert_allclose(PeerSelector(memory=reopened, name="rank0").weights, learned)
    assert reopened.cache_stats("cid-a")["accesses"] == 2
    assert UtilityCache(1.0, memory=reopened).utility("cid-a") > 0
    reopened.close()
