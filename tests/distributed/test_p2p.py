"""Lattica plane: real libp2p peers on 127.0.0.1 publishing, finding and fetching tensors."""

from __future__ import annotations

import json
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
    telemetry_key,
)

from .p2p_helpers import KEY, counters, flood_records, make_group, needs_lattica, raw_call
from .p2p_helpers import until as _until

pytestmark = pytest.mark.timeout(120)


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
    assert _until(
        lambda: (
            outsider.peer_id
            in (b._node._lattica_instance.get_with_subkey(telemetry_key(outsider.peer_id)) or {})
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


# ----- issue 16, item 1: serving enforces membership ----------------------------------
@needs_lattica
def test_non_member_cannot_read_over_rpc_or_bitswap(group):
    a, b, c, outsider = group  # outsider: a real peer holding the wrong group key
    t = torch.randn(300, 7, generator=torch.Generator().manual_seed(16))
    cid = a.publish(t)
    keyless = TensorPeer(bootstrap=[a.address])  # a real peer without any key
    try:
        for thief in (keyless, outsider):
            thief.add_members([a.peer_id])  # the thief trusts the publisher
            assert _until(lambda thief=thief: thief.providers(cid)) == [a.peer_id]
        before = counters(a)
        for thief in (keyless, outsider):
            with pytest.raises(LookupError):
                thief.fetch(cid)
        with pytest.raises(LookupError):
            outsider.fetch(cid, via="bitswap")
        # BitSwap serves any block to anyone: the payload itself is not there, and the
        # blocks that are (even if their CIDs leak) are ciphertext
        with pytest.raises(RuntimeError):
            keyless._node.get_block(cid, timeout_secs=1)
        plain = encode_tensor(t)
        for block_cid in a._manifests[cid]["blocks"]:
            _, block = keyless._node.get_block(block_cid, timeout_secs=5)
            assert plain[-4096:] not in bytes(block) and plain[:64] not in bytes(block)
        with pytest.raises(RuntimeError, match="BitSwap needs a group_key"):
            keyless.fetch(cid, via="bitswap")
        assert a.stats.rejected_unauthorized >= before["rejected_unauthorized"] + 3
        assert a.stats.served_bytes == before["served_bytes"]  # no byte of the body went out
        # members still get it, both ways
        assert torch.equal(b.fetch(cid), t)
        assert torch.equal(c.fetch(cid, via="bitswap"), t)
    finally:
        keyless.close()
        outsider.members.discard(a.peer_id)


@needs_lattica
def test_allowlist_group_confirms_the_requester_identity():
    x, y = make_group(2, key=None, cache_mb=0)
    intruder = TensorPeer(bootstrap=[x.address], cache_mb=0)
    try:
        t = torch.arange(1000, dtype=torch.int32)
        cid = x.publish(t)
        assert _until(lambda: y.providers(cid))
        assert torch.equal(y.fetch(cid), t)  # x dialled y back to confirm the nonce
        intruder.add_members([x.peer_id])
        assert _until(lambda: intruder.providers(cid))
        before = counters(x)
        # its telemetry ask and its head request are refused; every try ends in
        # LookupError (under load a dial can time out before reaching x: then it tries
        # again, for at most 30 s)
        deadline = time.monotonic() + 30
        while True:
            with pytest.raises(LookupError):
                intruder.fetch(cid)
            refused = x.stats.rejected_unauthorized > before["rejected_unauthorized"]
            if refused or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert refused, f"x never saw the intruder's request; intruder: {intruder.stats}"
        before = counters(x)
        # the intruder claims to be y: x asks y (libp2p-authenticated), y denies
        forged = json.loads(intruder._request("head", x.peer_id, cid))
        forged["from"] = y.peer_id
        request = json.dumps(forged).encode()
        frame = raw_call(intruder, x.peer_id, request)
        assert json.loads(frame[1:])["error"] == "pending"
        frame = _until(
            lambda: (f := raw_call(intruder, x.peer_id, request)) and b"pending" not in f and f
        )
        assert frame[:1] == b"\x01" and json.loads(frame[1:])["error"] == "unauthorized"
        assert x.stats.rejected_unauthorized == before["rejected_unauthorized"] + 1
        assert x.stats.served_bytes == len(encode_tensor(t))  # only y's download
    finally:
        for p in (x, y, intruder):
            p.close()


# ----- issue 16, item 2: telemetry survives a record flood ----------------------------
@needs_lattica
def test_telemetry_publish_survives_a_record_flood():
    m1, m2 = make_group(2, cache_mb=0)
    flooder = TensorPeer(bootstrap=[m1.address])
    try:
        m1.publish_telemetry()
        # junk subkeys until every record store in reach is full (MaxRecords), with an
        # expiry the attacker chose (~11 days)
        assert flood_records(flooder, "sedma/telemetry/v1") >= 1000
        with pytest.warns(RuntimeWarning, match="not stored in the DHT"):
            m2.publish_telemetry()  # raised "Failed to store: MaxRecords" before
        assert m2.stats.telemetry_store_failed == 1
        assert set(m1.peer_telemetry()) == set(m2.peer_telemetry()) == {m1.peer_id, m2.peer_id}
        t = torch.randn(64, generator=torch.Generator().manual_seed(3))
        cid = m1.publish(t)
        assert _until(lambda: m2.providers(cid))
        assert torch.equal(m2.fetch(cid), t) and torch.equal(m2.fetch(cid, via="bitswap"), t)
    finally:
        for p in (m1, m2, flooder):
            p.close()


@needs_lattica
def test_forged_and_far_future_telemetry_records_are_ignored():
    m1, m2 = make_group(2, cache_mb=0)
    attacker = TensorPeer(bootstrap=[m1.address])
    try:
        real = m1.publish_telemetry()
        assert _until(lambda: m1.peer_id in m2.peer_telemetry())
        key1 = telemetry_key(m1.peer_id)
        now = time.time()

        def forged(body, sign=False):
            raw = json.dumps(body, sort_keys=True, separators=(",", ":"))
            payload = {"body": raw}
            if sign:  # a key holder gone rogue: a valid tag on a record that never expires
                payload["hmac"] = m1._sign(raw.encode())
            return json.dumps(payload).encode()

        lie = {"peer": m1.peer_id, "availability": 1.0, "mem_free_gb": 1e6, "issued": now}
        cases = [  # (value, DHT expiry, counter that must grow)
            (forged({**lie, "expires": now + 50}), now + 50, "bad_signature"),
            (forged({**lie, "expires": now + 1e6}, sign=True), now + 50, "rejected_expiry"),
            (forged({**lie, "expires": now + 50}, sign=True), now + 1e6, "rejected_expiry"),
        ]
        for value, expiry, counter in cases:
            # written over m1's own record, under its key and subkey
            attacker._node._lattica_instance.store_with_subkey(key1, value, expiry, m1.peer_id)
            assert _until(
                lambda value=value: (
                    (
                        (m2._node._lattica_instance.get_with_subkey(key1) or {}).get(m1.peer_id)
                        or (None,)
                    )[0]
                    == value
                )
            )
            before = counters(m2)
            seen = m2.peer_telemetry().get(m1.peer_id)  # m1's real record, asked over RPC
            assert seen is not None, counter
            assert seen["mem_free_gb"] == pytest.approx(real["mem_free_gb"]), counter
            assert counters(m2)[counter] == before[counter] + 1, counter
    finally:
        for p in (m1, m2, attacker):
            p.close()


# ----- issue 16, item 3: the size is checked before the body moves --------------------
@needs_lattica
def test_oversized_payload_is_refused_before_any_body_byte_moves(group):
    a, b, _, _ = group
    t = torch.randn(20_000, generator=torch.Generator().manual_seed(4))
    cid = a.publish(t)
    assert _until(lambda: b.providers(cid))
    served, before = a.stats.served_bytes, b.stats.rejected_oversized
    b.max_bytes = 50_000  # the payload is 80 kB
    try:
        for via in ("rpc", "bitswap"):
            with pytest.raises(LookupError):
                b.fetch(cid, via=via)
    finally:
        b.max_bytes = 256 * 2**20
    assert b.stats.rejected_oversized == before + 2
    assert a.stats.served_bytes == served  # refused on the header: no body was sent
    assert torch.equal(b.fetch(cid), t)
    assert a.stats.served_bytes == served + len(encode_tensor(t))


@needs_lattica
def test_payload_travels_in_chunks_and_the_server_caps_them():
    p, q = make_group(2, chunk_bytes=4096, cache_mb=0)
    try:
        t = torch.randn(10_000, generator=torch.Generator().manual_seed(5))  # ~40 kB
        cid = p.publish(t)
        assert len(p._manifests[cid]["blocks"]) == 10
        assert _until(lambda: q.providers(cid))
        assert torch.equal(q.fetch(cid), t)
        assert torch.equal(q.fetch(cid, via="bitswap"), t)
        # a request for more than MAX_CHUNK_BYTES is refused, not built
        frame = raw_call(q, p.peer_id, q._request("body", p.peer_id, cid, off=0, len=2**30))
        assert json.loads(frame[1:])["error"] == "malformed"
    finally:
        p.close()
        q.close()


# ----- issue 17, item 1: DHT misses have a second source, every lookup a deadline ---------
@needs_lattica
def test_lookup_that_lattica_never_answers_ends_at_the_deadline():
    lone = TensorPeer(cache_mb=0, request_timeout_s=1)  # no peer: get_providers never returns
    try:
        cid = content_id(b"nobody provides this")
        start = time.monotonic()
        assert lone.providers(cid) == []
        with pytest.raises(LookupError):
            lone.fetch(cid)
        assert time.monotonic() - start < 10  # two lookups of at most 1 s each (plus a thread)
        assert lone.stats.dht_failures == 2
    finally:
        lone.close()


@needs_lattica
def test_record_the_dht_lost_is_asked_from_its_author(group):
    a, b, _, outsider = group
    key, value = "sedma/test/lost-index", b"a's signed record"
    a.store_record(key, value, time.time() + 60)
    assert _until(lambda: a.peer_id in b.get_records(key))
    # Lattica keeps the subkeys of a key in one index record that anyone can overwrite (a
    # concurrent store of another member does the same by accident): here a non-member does
    outsider._node._lattica_instance.store_with_subkey(
        f"{key}#index", b"\xff" * 8, time.time() + 60, None
    )
    assert _until(lambda: b.get_records(key) == {}), "the index was not overwritten"
    before = counters(b)
    got = b.get_records(key, ask=[a.peer_id, outsider.peer_id])
    assert set(got) == {a.peer_id} and got[a.peer_id][0] == value  # from a itself
    assert b.stats.record_fallbacks == before["record_fallbacks"] + 1
    assert b.stats.unknown_peer == before["unknown_peer"] + 1  # the non-member is not asked
    # a member serves only its own record, under the key asked for, to members only
    assert b.get_records("sedma/test/never-stored", ask=[a.peer_id]) == {}
    refused = counters(a)["rejected_unauthorized"]
    outsider.add_members([a.peer_id])  # the outsider trusts a; a does not admit it
    try:
        asked = []  # until a saw the request (a dial can time out under load; bounded)
        assert _until(
            lambda: (
                asked.append(outsider.get_records(key, ask=[a.peer_id]))
                or a.stats.rejected_unauthorized > refused
            ),
            30,
        )
        assert all(got == {} for got in asked)
    finally:
        outsider.members.discard(a.peer_id)


@needs_lattica
def test_fetch_asks_the_named_author_when_no_provider_is_found(group):
    a, b, _, outsider = group
    t = torch.randn(50, generator=torch.Generator().manual_seed(17))
    data = encode_tensor(t)
    cid = content_id(data)
    wrong = content_id(encode_tensor(torch.zeros(50)))
    held = encode_tensor(torch.ones(50))
    a._blocks[cid] = data  # held and served by a, never advertised: the lookup finds nobody
    try:
        assert b.providers(cid) == []
        with pytest.raises(LookupError):
            b.fetch(cid)
        before = counters(b)
        assert torch.equal(b.fetch(cid, ask=[a.peer_id]), t)
        assert b.stats.provider_fallbacks == before["provider_fallbacks"] + 1
        # the payload checks still apply to a named author: a member serving other bytes
        a._blocks[wrong] = data
        with pytest.raises(LookupError):
            b.fetch(wrong, ask=[a.peer_id])
        assert b.stats.rejected_cid == before["rejected_cid"] + 1
        # a non-member is never asked, whatever it holds
        outsider._blocks[content_id(held)] = held
        served = outsider.stats.served_bytes
        with pytest.raises(LookupError):
            b.fetch(content_id(held), ask=[outsider.peer_id])
        assert b.stats.unknown_peer > before["unknown_peer"]
        assert outsider.stats.served_bytes == served
    finally:
        a._blocks.pop(cid, None)
        a._blocks.pop(wrong, None)
        outsider._blocks.pop(content_id(held), None)


@needs_lattica
def test_key_holder_is_admitted_by_its_request_and_a_wrong_key_is_not():
    gate = TensorPeer(group_key=KEY, cache_mb=0, admit_key_holders=True)
    holder = TensorPeer(bootstrap=[gate.address], group_key=KEY, cache_mb=0)
    wrong = TensorPeer(bootstrap=[gate.address], group_key=b"another-key", cache_mb=0)
    strict = TensorPeer(bootstrap=[gate.address], group_key=KEY, cache_mb=0)  # the default
    try:
        t = torch.randn(40, generator=torch.Generator().manual_seed(18))
        cid = gate.publish(t)
        cid_strict = strict.publish(t + 1)
        for p in (holder, wrong):  # they trust the gate; it has admitted nobody
            p.add_members([gate.peer_id, strict.peer_id])
        assert _until(lambda: holder.providers(cid) and wrong.providers(cid))
        # a valid group-key HMAC is the credential: the holder is admitted and served
        assert torch.equal(holder.fetch(cid), t)
        assert holder.peer_id in gate.members
        # a request signed with another key is refused and admits nobody (bounded retries:
        # under load a dial can time out before the request reaches the gate)
        refused = gate.stats.rejected_unauthorized
        assert _until(
            lambda: _refused_fetch(wrong, cid) and gate.stats.rejected_unauthorized > refused, 30
        )
        assert wrong.peer_id not in gate.members and gate.stats.served_bytes == len(
            encode_tensor(t)
        )
        # without admit_key_holders the key alone does not admit
        assert _until(lambda: holder.providers(cid_strict))
        with pytest.raises(LookupError):
            holder.fetch(cid_strict)
        assert holder.peer_id not in strict.members
    finally:
        for p in (gate, holder, wrong, strict):
            p.close()


def _refused_fetch(peer: TensorPeer, cid: str) -> bool:
    with pytest.raises(LookupError):
        peer.fetch(cid)
    return True


def test_bad_constructor_arguments_name_the_problem():
    with pytest.raises(ValueError, match="chunk_bytes"):
        TensorPeer(chunk_bytes=0)
    with pytest.raises(ValueError, match="telemetry_ttl_s"):
        TensorPeer(telemetry_ttl_s=1e6)
    with pytest.raises(ValueError, match=r"bitswap=True .*group_key"):
        TensorPeer(bitswap=True)
    with pytest.raises(ValueError, match="group_key must not be empty"):
        TensorPeer(group_key=b"")
