"""Hostile peers against a running group of honest Lattica peers on 127.0.0.1.

Each attack (non-member read, record flood, oversized, malformed, replayed and wrong-CID
payloads) is rejected and counted in :class:`P2PStats`, the oversized one with the
receiver's peak RSS bounded, and the honest peers keep exchanging correctly.
"""

from __future__ import annotations

import hmac
import json
import time

import pytest
import torch

from sedma_torch.distributed.p2p import (
    MAX_CHUNK_BYTES,
    TELEMETRY_KEY,
    TensorPeer,
    content_id,
    encode_tensor,
)
from tests.distributed.p2p_helpers import (
    KEY,
    LyingMember,
    counters,
    flood_records,
    make_group,
    measure_receiver,
    needs_lattica,
    raw_call,
    until,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120), needs_lattica]

MAX_BYTES = 64 * 2**20


def _tensor(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _error(frame: bytes) -> str:
    assert frame[:1] == b"\x01", frame[:80]
    return json.loads(frame[1:])["error"]


def _exchange_ok(a: TensorPeer, b: TensorPeer, c: TensorPeer, seed: int) -> None:
    """The honest peers still publish, find and fetch correctly (RPC and BitSwap)."""
    t = _tensor(2048, seed)
    cid = a.publish(t)
    assert until(lambda: b.providers(cid) and c.providers(cid))
    assert torch.equal(b.fetch(cid), t)
    assert torch.equal(c.fetch(cid, via="bitswap"), t)


@pytest.fixture(scope="module")
def honest():
    peers = make_group(3, cache_mb=0)
    time.sleep(0.3)
    yield peers
    for p in peers:
        p.close()


@pytest.fixture
def attacker(honest):
    """A real peer on the same network, outside the group, without the key; it trusts
    the honest peers (so it does ask them)."""
    peer = TensorPeer(bootstrap=[honest[0].address], cache_mb=0)
    peer.add_members(p.peer_id for p in honest)
    yield peer
    peer.close()


def test_non_member_read_is_refused_and_counted(honest, attacker):
    a, b, c = honest
    wrong_key = TensorPeer(bootstrap=[a.address], group_key=b"not-the-group-key", cache_mb=0)
    try:
        wrong_key.add_members(p.peer_id for p in honest)
        t = _tensor(5000, 1)
        cid = a.publish(t)
        assert until(lambda: attacker.providers(cid) and wrong_key.providers(cid))
        before = counters(a)
        with pytest.raises(LookupError):
            attacker.fetch(cid)
        for via in ("rpc", "bitswap"):
            with pytest.raises(LookupError):
                wrong_key.fetch(cid, via=via)
        # BitSwap hands blocks to anyone: the payload is not there, only ciphertext is
        with pytest.raises(RuntimeError):
            attacker._node.get_block(cid, timeout_secs=1)
        block_cid = a._manifests[cid]["blocks"][0]
        _, block = attacker._node.get_block(block_cid, timeout_secs=5)
        assert encode_tensor(t)[:256] not in bytes(block)
        # impersonating member b without the key: no valid HMAC
        forged = json.loads(attacker._request("body", a.peer_id, cid, off=0, len=64))
        forged["from"] = b.peer_id
        frame = raw_call(attacker, a.peer_id, json.dumps(forged).encode())
        assert _error(frame) == "unauthorized"
        assert a.stats.rejected_unauthorized >= before["rejected_unauthorized"] + 4
        assert a.stats.served_bytes == before["served_bytes"]
        _exchange_ok(a, b, c, seed=101)
    finally:
        wrong_key.close()


def test_record_flood_does_not_break_member_telemetry():
    # its own network: the junk stays in every record store it reaches for ~11 days
    m1, m2 = make_group(2, cache_mb=0)
    flooder = TensorPeer(bootstrap=[m1.address], cache_mb=0)
    try:
        m1.publish_telemetry()
        stored = flood_records(flooder, TELEMETRY_KEY)
        assert stored >= 1000
        with pytest.warns(RuntimeWarning, match="MaxRecords"):
            m2.publish_telemetry()
        assert m2.stats.telemetry_store_failed == 1
        view1, view2 = m1.peer_telemetry(), m2.peer_telemetry()
        assert set(view1) == set(view2) == {m1.peer_id, m2.peer_id}
        assert m1.stats.unknown_peer == 0  # the junk sits under a key members never read
        t = _tensor(1000, 2)
        cid = m2.publish(t)
        assert until(lambda: m1.providers(cid))
        assert torch.equal(m1.fetch(cid), t)
        assert torch.equal(m1.fetch(cid, via="bitswap"), t)
    finally:
        for p in (m1, m2, flooder):
            p.close()


def test_oversized_payload_is_refused_with_bounded_receiver_rss(honest):
    a, b, c = honest
    big = TensorPeer(bootstrap=[a.address], group_key=KEY, cache_mb=0)  # an honest member
    try:
        big.add_members(p.peer_id for p in honest)
        payload = torch.ones(50_000_000)  # 200 MB, over the receiver's 64 MiB
        cid = big.publish(payload)
        del payload
        report = measure_receiver(big, cid, key=KEY, max_bytes=MAX_BYTES)
        bound_mb = MAX_BYTES / 1e6 / 2  # before: +471 MB (RPC), +1002 MB (BitSwap)
        for row in report["results"]:
            assert row["outcome"] == "rejected", row
            assert row["peak_growth_mb"] < bound_mb, row
            assert row["seconds"] < 5, row
        assert report["stats"]["rejected_oversized"] == 2
        assert big.stats.served_bytes == 0
        # a member that announces an honest size but pads every chunk
        liar = LyingMember(bootstrap=[a.address], group_key=KEY, cache_mb=0, chunk_bytes=4096)
        try:
            liar.add_members(p.peer_id for p in honest)
            b.add_members([liar.peer_id])
            t = _tensor(3000, 3)
            cid = liar.publish(t)
            assert until(lambda: b.providers(cid))
            before = b.stats.rejected_oversized
            with pytest.raises(LookupError):
                b.fetch(cid)
            assert b.stats.rejected_oversized == before + 1
            # the server side: a chunk over MAX_CHUNK_BYTES is refused, never built
            request = b._request("body", liar.peer_id, cid, off=0, len=MAX_CHUNK_BYTES + 1)
            assert _error(raw_call(b, liar.peer_id, request)) == "malformed"
        finally:
            liar.close()
            b.members.discard(liar.peer_id)
        _exchange_ok(a, b, c, seed=103)
    finally:
        big.close()


def test_malformed_requests_and_payloads_are_refused(honest, attacker):
    a, b, c = honest
    t = _tensor(100, 4)
    cid = a.publish(t)
    valid = json.loads(attacker._request("head", a.peer_id, cid))
    garbage = [
        b"\xff\xfe not json",
        b"{",
        b"[1, 2, 3]",
        b"x" * 5000,
        json.dumps({**valid, "op": "delete"}).encode(),
        json.dumps({**valid, "cid": "../../etc/passwd"}).encode(),
        json.dumps({**valid, "from": 7}).encode(),
        json.dumps({**valid, "ts": "yesterday"}).encode(),
        json.dumps({**valid, "op": "body", "off": -1, "len": 10}).encode(),
    ]
    before = a.stats.rejected_malformed
    for request in garbage:
        assert _error(raw_call(attacker, a.peer_id, request)) == "malformed", request[:40]
    assert a.stats.rejected_malformed == before + len(garbage)
    # a member provides bytes that match their CID but are no safetensors file
    junk = b"\x80\x04\x95 pickled-looking garbage" * 10
    junk_cid = content_id(junk)
    c._blocks[junk_cid] = junk
    c._node.start_providing(junk_cid)
    assert until(lambda: b.providers(junk_cid))
    before = b.stats.rejected_malformed
    with pytest.raises(LookupError):
        b.fetch(junk_cid)
    assert b.stats.rejected_malformed == before + 1
    _exchange_ok(a, b, c, seed=104)


def test_replayed_requests_are_refused(honest, attacker):
    a, b, c = honest
    t = _tensor(1000, 5)
    cid = a.publish(t)
    request = b._request("body", a.peer_id, cid, off=0, len=128)
    first = raw_call(b, a.peer_id, request)  # b's own use of it
    assert first[:1] == b"\x00" and first[1:] == encode_tensor(t)[:128]
    before = a.stats.rejected_replayed
    assert _error(raw_call(attacker, a.peer_id, request)) == "replayed"  # captured, resent
    assert _error(raw_call(b, a.peer_id, request)) == "replayed"
    # a correctly signed request whose timestamp is two minutes old
    stale = json.loads(b._request("head", a.peer_id, cid))
    stale["ts"] -= 120
    stale.pop("mac")
    body = json.dumps(stale, sort_keys=True, separators=(",", ":")).encode()
    stale["mac"] = hmac.new(b._request_key, body, "sha256").hexdigest()
    assert _error(raw_call(attacker, a.peer_id, json.dumps(stale).encode())) == "replayed"
    assert a.stats.rejected_replayed == before + 3
    _exchange_ok(a, b, c, seed=105)


def test_wrong_cid_payloads_are_refused(honest):
    a, b, _ = honest
    t = _tensor(4000, 6)
    cid = a.publish(t)
    other = a.publish(_tensor(4000, 7))
    assert until(lambda: b.providers(cid))
    honest_bytes, honest_manifest = a._blocks[cid], a._manifests[cid]
    a._blocks[cid] = a._blocks[other]  # RPC: serves another tensor's bytes
    a._manifests[cid] = a._manifests[other]  # BitSwap: points at another tensor's blocks
    try:
        before_cid, before_bad = b.stats.rejected_cid, b.stats.rejected_malformed
        with pytest.raises(LookupError):
            b.fetch(cid)
        assert b.stats.rejected_cid == before_cid + 1
        with pytest.raises(LookupError):
            b.fetch(cid, via="bitswap")  # sealed to another CID: does not decrypt
        assert b.stats.rejected_malformed == before_bad + 1
    finally:
        a._blocks[cid], a._manifests[cid] = honest_bytes, honest_manifest
    assert torch.equal(b.fetch(cid), t)
    assert torch.equal(b.fetch(cid, via="bitswap"), t)


def test_honest_peers_unaffected_after_the_attacks(honest):
    a, b, c = honest
    for p in honest:
        p.publish_telemetry()
    assert until(lambda: set(b.peer_telemetry()) == {p.peer_id for p in honest})
    for seed in (200, 201):
        _exchange_ok(a, b, c, seed)
        _exchange_ok(c, a, b, seed + 10)
    assert all(p.stats.telemetry_store_failed == 0 for p in honest)
