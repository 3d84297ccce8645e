"""Lattica plane: real libp2p peers on 127.0.0.1 publishing, finding and fetching tensors."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save as st_save

from sedma_torch.distributed.p2p import (
    PayloadRejected,
    TensorPeer,
    content_id,
    decode_tensor,
    encode_tensor,
)

pytestmark = pytest.mark.timeout(120)

try:
    import lattica  # noqa: F401

    LATTICA_ERROR = None
except Exception as exc:  # pragma: no cover - environment dependent
    LATTICA_ERROR = f"{type(exc).__name__}: {exc}"

needs_lattica = pytest.mark.skipif(
    LATTICA_ERROR is not None, reason=f"Lattica cannot run: {LATTICA_ERROR}"
)

KEY = b"training-group-secret"


def _until(predicate, timeout_s=10.0):
    limit = time.monotonic() + timeout_s
    while time.monotonic() < limit:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="module")
def group():
    a = TensorPeer(group_key=KEY, cache_mb=1.0)
    b = TensorPeer(bootstrap=[a.address], group_key=KEY, cache_mb=1.0)
    c = TensorPeer(bootstrap=[a.address], group_key=KEY, cache_mb=1.0)
    outsider = TensorPeer(bootstrap=[a.address], group_key=b"another-key")
    members = [a.peer_id, b.peer_id, c.peer_id]
    for p in (a, b, c):
        p.add_members(members)
    time.sleep(0.5)
    yield a, b, c, outsider
    for p in (a, b, c, outsider):
        p.close()


def test_decode_rejects_bad_payloads():
    t = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    data = encode_tensor(t)
    torch.testing.assert_close(decode_tensor(data, max_bytes=10_000), t)
    with pytest.raises(PayloadRejected, match="exceeds max_bytes"):
        decode_tensor(data, max_bytes=len(data) - 1)
    with pytest.raises(PayloadRejected, match="CID"):
        decode_tensor(data, max_bytes=10_000, expected_cid=content_id(b"other"))
    with pytest.raises(PayloadRejected, match="safetensors"):
        decode_tensor(b"\x80\x04\x95 pickled-looking garbage", max_bytes=10_000)
    with pytest.raises(PayloadRejected, match="one tensor"):
        decode_tensor(st_save({"a": t, "b": t.clone()}), max_bytes=10_000)
    with pytest.raises(PayloadRejected, match="shape"):
        decode_tensor(data, max_bytes=10_000, shape=(3, 4))
    with pytest.raises(PayloadRejected, match="dtype"):
        decode_tensor(data, max_bytes=10_000, dtype=torch.float64)


@needs_lattica
def test_content_id_equals_lattica_block_cid(group):
    a = group[0]
    for payload in (b"hello world", encode_tensor(torch.arange(10.0))):
        assert a._node.put_block(payload) == content_id(payload)


@needs_lattica
def test_three_peers_publish_find_and_fetch(group):
    a, b, c, _ = group
    t = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    cid = a.publish(t)
    assert _until(lambda: b.providers(cid)) == [a.peer_id]
    got = b.fetch(cid, shape=(64, 32), dtype=torch.float32)
    assert torch.equal(got, t)
    got_bitswap = c.fetch(cid, via="bitswap")
    assert torch.equal(got_bitswap, t)
    # cache: the second fetch is a hit (no transfer)
    fetched = b.stats.fetched
    assert torch.equal(b.fetch(cid), t)
    assert b.stats.fetched == fetched and b.stats.cache_hits == 1
    assert b.cache.stats.hit_rate == pytest.approx(0.5)
    # c now provides too: b ranks both members with the telemetry they published
    assert c.publish(t) == cid
    for p in (a, c):
        p.publish_telemetry()
    telemetry = _until(lambda: len(b.peer_telemetry()) >= 2 and b.peer_telemetry())
    assert {a.peer_id, c.peer_id} <= set(telemetry)
    ranked = _until(lambda: len(b.rank_providers(cid)) == 2 and b.rank_providers(cid))
    assert sorted(ranked) == sorted([a.peer_id, c.peer_id])
    scores = b.selector.scores(b._last_candidates)
    assert ranked[0] == max(scores, key=scores.get)
    # the outcomes reached the memory
    assert b.selector.memory.peer_profile(a.peer_id)["successes"] >= 1


@needs_lattica
def test_unknown_peer_is_dropped_and_counted(group):
    _, b, _, outsider = group
    t = torch.ones(5)
    cid = outsider.publish(t)
    _until(lambda: b._node.get_providers(cid))
    before = b.stats.unknown_peer
    with pytest.raises(LookupError):
        b.fetch(cid)
    assert b.stats.unknown_peer > before
    with pytest.raises(LookupError):
        b.fetch(cid, via="bitswap")
    # its telemetry record is dropped too, even when admitted: its HMAC key is wrong
    outsider.publish_telemetry()
    _until(
        lambda: (
            outsider.peer_id
            in (b._node._lattica_instance.get_with_subkey("sedma/telemetry/v1") or {})
        )
    )
    assert outsider.peer_id not in b.peer_telemetry()
    b.add_members([outsider.peer_id])
    assert outsider.peer_id not in b.peer_telemetry()
    assert b.stats.bad_signature >= 1
    b.members.discard(outsider.peer_id)


@needs_lattica
def test_cid_mismatch_and_oversize_payloads_are_rejected(group):
    a, b, _, _ = group
    t = torch.randn(16, generator=torch.Generator().manual_seed(2))
    cid = a.publish(t)
    _until(lambda: b.providers(cid))
    a._blocks[cid] = encode_tensor(torch.zeros(16))  # a member serving the wrong bytes
    before = b.stats.rejected_payloads
    with pytest.raises(LookupError):
        b.fetch(cid)
    assert b.stats.rejected_payloads == before + 1
    a._blocks[cid] = encode_tensor(t)
    b.max_bytes = 64  # smaller than the payload
    try:
        with pytest.raises(LookupError):
            b.fetch(cid)
        assert b.stats.rejected_payloads == before + 2
    finally:
        b.max_bytes = 256 * 2**20
    assert torch.equal(b.fetch(cid), t)
