"""Hostile peers against a group of honest Lattica peers on 127.0.0.1: what each attack
gets, what it costs the receiver, and whether the honest peers still exchange.

Attacks (all real peers, real Lattica, no mocks): a non-member reading a published
tensor (no key / wrong key, RPC and BitSwap), a peer claiming a member's id in an
allowlist group, a record flood of the DHT (``MaxRecords``), forged telemetry (unsigned,
signed with a far-future expiry), an honest member serving a payload over the receiver's
``max_bytes`` (RPC and BitSwap; the receiver runs in its own process), a member padding
its chunks, malformed requests, a non-safetensors payload, replayed requests and
wrong-CID payloads (RPC and BitSwap).

Columns: ``rejected`` = how many refusals the attack produced in the counters of the
peer it targeted (:class:`~sedma_torch.distributed.p2p.P2PStats`); ``honest ok`` = the
honest peers then still publish, find and fetch correctly (RPC and BitSwap); ``peak RSS``
= growth of the receiver's peak RSS during the attack in MB (``VmHWM``, reset before the
attack): measured in a separate receiver process for the oversized rows, for the others
in this process, which hosts every peer (marked ``*``); ``seconds`` = time from the attack
to its refusal.

    python scripts/bench_hostile_peers.py              # ~1 min on 2 shared cores
    python scripts/bench_hostile_peers.py --payload-mb 500 --max-mib 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from sedma_torch.distributed.p2p import (  # noqa: E402
    MAX_CHUNK_BYTES,
    TELEMETRY_KEY,
    TensorPeer,
    content_id,
    telemetry_key,
)
from tests.distributed.p2p_helpers import (  # noqa: E402  (shared with the tests)
    KEY,
    LyingMember,
    current_rss,
    flood_records,
    make_group,
    measure_receiver,
    peak_rss,
    raw_call,
    reset_peak_rss,
    until,
)


def _count(peer: TensorPeer, *names: str) -> int:
    stats = dataclasses.asdict(peer.stats)
    return sum(stats[n] for n in names)


def _honest_ok(a: TensorPeer, b: TensorPeer, c: TensorPeer, seed: int) -> bool:
    t = torch.randn(2048, generator=torch.Generator().manual_seed(seed))
    try:
        cid = a.publish(t)
        if not until(lambda: b.providers(cid) and c.providers(cid)):
            return False
        return torch.equal(b.fetch(cid), t) and torch.equal(c.fetch(cid, via="bitswap"), t)
    except Exception:
        return False


class Row:
    def __init__(self, attack: str) -> None:
        self.attack = attack
        self.rejected = 0
        self.honest = False
        self.rss_mb = float("nan")
        self.in_process = True
        self.seconds = float("nan")

    def __enter__(self):
        reset_peak_rss()
        self._rss0 = current_rss()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.seconds != self.seconds:  # not set by the attack itself
            self.seconds = time.perf_counter() - self._t0
        if self.in_process:
            self.rss_mb = (peak_rss() - self._rss0) / 1e6
        return False


def _refused(fn) -> bool:
    try:
        fn()
    except (LookupError, RuntimeError):
        return True
    return False


def run(payload_mb: int, max_mib: int) -> list[Row]:
    rows: list[Row] = []
    a, b, c = make_group(3, cache_mb=0)
    time.sleep(0.3)
    attacker = TensorPeer(bootstrap=[a.address], cache_mb=0)
    wrong = TensorPeer(bootstrap=[a.address], group_key=b"not-the-group-key", cache_mb=0)
    for p in (attacker, wrong):
        p.add_members([a.peer_id, b.peer_id, c.peer_id])
    seed = 1000
    try:
        t = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
        cid = a.publish(t)
        until(lambda: attacker.providers(cid) and wrong.providers(cid))

        for name, thief, via in [
            ("non-member read, no key (RPC)", attacker, "rpc"),
            ("non-member read, wrong key (RPC)", wrong, "rpc"),
            ("non-member read, wrong key (BitSwap)", wrong, "bitswap"),
        ]:
            before = _count(a, "rejected_unauthorized")
            with Row(name) as row:
                ok = _refused(lambda thief=thief, via=via: thief.fetch(cid, via=via))
            row.rejected = _count(a, "rejected_unauthorized") - before if ok else 0
            seed += 1
            row.honest = _honest_ok(a, b, c, seed)
            rows.append(row)

        with Row("BitSwap get_block of the payload CID") as row:
            ok = _refused(lambda: attacker._node.get_block(cid, timeout_secs=1))
        row.rejected = int(ok)
        row.honest = _honest_ok(a, b, c, seed := seed + 1)
        rows.append(row)

        # allowlist group: claim a member's id (the server dials that member to confirm)
        x, y = make_group(2, key=None, cache_mb=0, bootstrap=a.address)
        try:
            xc = x.publish(t)
            until(lambda: y.providers(xc))
            forged = json.loads(attacker._request("head", x.peer_id, xc))
            forged["from"] = y.peer_id
            request = json.dumps(forged).encode()
            before = _count(x, "rejected_unauthorized")
            with Row("impersonate a member (allowlist group)") as row:
                until(lambda: b"pending" not in raw_call(attacker, x.peer_id, request))
            row.rejected = _count(x, "rejected_unauthorized") - before
            row.honest = torch.equal(y.fetch(xc), t)
            rows.append(row)
        finally:
            x.close()
            y.close()

        # record flood, in its own network (the junk stays for ~11 days)
        m1, m2 = make_group(2, cache_mb=0)
        flooder = TensorPeer(bootstrap=[m1.address], cache_mb=0)
        try:
            m1.publish_telemetry()
            stored = flood_records(flooder, TELEMETRY_KEY)
            with (
                Row(f"DHT record flood ({stored} junk records; store failure counted)") as row,
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore", RuntimeWarning)
                m2.publish_telemetry()  # degrades to RPC, does not raise
            row.rejected = m2.stats.telemetry_store_failed
            view = set(m1.peer_telemetry()) & set(m2.peer_telemetry())
            tf = torch.arange(64.0)
            fc = m1.publish(tf)
            until(lambda: m2.providers(fc))
            row.honest = view == {m1.peer_id, m2.peer_id} and torch.equal(m2.fetch(fc), tf)
            rows.append(row)
        finally:
            for p in (m1, m2, flooder):
                p.close()

        real = a.publish_telemetry()
        now = time.time()
        lie = {"peer": a.peer_id, "availability": 1.0, "mem_free_gb": 1e6, "issued": now}
        for name, body, sign, expiry in [
            ("forged telemetry, unsigned", {**lie, "expires": now + 50}, False, now + 50),
            ("forged telemetry, far-future expiry", {**lie, "expires": now + 1e6}, True, now + 50),
        ]:
            raw = json.dumps(body, sort_keys=True, separators=(",", ":"))
            payload = {"body": raw, **({"hmac": a._sign(raw.encode())} if sign else {})}
            value = json.dumps(payload).encode()
            attacker._node._lattica_instance.store_with_subkey(
                telemetry_key(a.peer_id), value, expiry, a.peer_id
            )
            until(
                lambda value=value: (
                    (b._node._lattica_instance.get_with_subkey(telemetry_key(a.peer_id)) or {}).get(
                        a.peer_id, (None,)
                    )[0]
                    == value
                )
            )
            before = _count(b, "bad_signature", "rejected_expiry")
            with Row(name) as row:
                seen = b.peer_telemetry([a.peer_id]).get(a.peer_id)
            row.rejected = _count(b, "bad_signature", "rejected_expiry") - before
            row.honest = seen is not None and seen["mem_free_gb"] == real["mem_free_gb"]
            rows.append(row)

        # an honest member serving a payload over the receiver's max_bytes
        big = TensorPeer(bootstrap=[a.address], group_key=KEY, cache_mb=0)
        try:
            big.add_members([a.peer_id, b.peer_id, c.peer_id])
            payload_t = torch.ones(payload_mb * 250_000)
            big_cid = big.publish(payload_t)
            del payload_t
            report = measure_receiver(big, big_cid, key=KEY, max_bytes=max_mib * 2**20)
            for result in report["results"]:
                row = Row(f"oversized {payload_mb} MB > max_bytes {max_mib} MiB ({result['via']})")
                row.in_process = False
                row.rejected = int(result["outcome"] == "rejected")
                row.rss_mb = result["peak_growth_mb"]
                row.seconds = result["seconds"]
                row.honest = _honest_ok(a, b, c, seed := seed + 1)
                rows.append(row)
        finally:
            big.close()

        liar = LyingMember(bootstrap=[a.address], group_key=KEY, cache_mb=0, chunk_bytes=4096)
        try:
            liar.add_members([a.peer_id, b.peer_id, c.peer_id])
            b.add_members([liar.peer_id])
            lc = liar.publish(torch.randn(3000))
            until(lambda: b.providers(lc))
            before = _count(b, "rejected_oversized")
            with Row("member pads its chunks past the asked length") as row:
                _refused(lambda: b.fetch(lc))
            row.rejected = _count(b, "rejected_oversized") - before
            row.honest = _honest_ok(a, b, c, seed := seed + 1)
            rows.append(row)
        finally:
            liar.close()
            b.members.discard(liar.peer_id)

        valid = json.loads(attacker._request("head", a.peer_id, cid))
        garbage = [
            b"\xff\xfe not json",
            b"{",
            b"[1, 2, 3]",
            b"x" * 5000,
            json.dumps({**valid, "op": "delete"}).encode(),
            json.dumps({**valid, "cid": "../../etc/passwd"}).encode(),
            json.dumps({**valid, "op": "body", "off": 0, "len": MAX_CHUNK_BYTES + 1}).encode(),
        ]
        before = _count(a, "rejected_malformed")
        with Row(f"malformed requests (x{len(garbage)})") as row:
            for request in garbage:
                raw_call(attacker, a.peer_id, request)
        row.rejected = _count(a, "rejected_malformed") - before
        row.honest = _honest_ok(a, b, c, seed := seed + 1)
        rows.append(row)

        junk = b"\x80\x04\x95 pickled-looking garbage" * 10
        junk_cid = content_id(junk)
        c._blocks[junk_cid] = junk  # a member providing bytes that are no safetensors file
        c._node.start_providing(junk_cid)
        until(lambda: b.providers(junk_cid))
        before = _count(b, "rejected_malformed")
        with Row("malformed payload (matches its CID)") as row:
            _refused(lambda: b.fetch(junk_cid))
        row.rejected = _count(b, "rejected_malformed") - before
        row.honest = _honest_ok(a, b, c, seed := seed + 1)
        rows.append(row)

        request = b._request("body", a.peer_id, cid, off=0, len=128)
        raw_call(b, a.peer_id, request)  # b's own use
        before = _count(a, "rejected_replayed")
        with Row("replayed request (x3)") as row:
            for _ in range(3):
                raw_call(attacker, a.peer_id, request)
        row.rejected = _count(a, "rejected_replayed") - before
        row.honest = _honest_ok(a, b, c, seed := seed + 1)
        rows.append(row)

        other = a.publish(torch.randn(100_000))
        saved = a._blocks[cid], a._manifests[cid]
        a._blocks[cid], a._manifests[cid] = a._blocks[other], a._manifests[other]
        try:
            for name, via, counter in [
                ("wrong-CID payload (RPC)", "rpc", "rejected_cid"),
                ("wrong-CID blocks (BitSwap)", "bitswap", "rejected_malformed"),
            ]:
                before = _count(b, counter)
                with Row(name) as row:
                    _refused(lambda via=via: b.fetch(cid, via=via))
                row.rejected = _count(b, counter) - before
                rows.append(row)
        finally:
            a._blocks[cid], a._manifests[cid] = saved
        for row in rows[-2:]:
            row.honest = _honest_ok(a, b, c, seed := seed + 1) and torch.equal(b.fetch(cid), t)
    finally:
        for p in (a, b, c, attacker, wrong):
            p.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payload-mb", type=int, default=200, help="oversized payload (MB)")
    parser.add_argument("--max-mib", type=int, default=64, help="receiver max_bytes (MiB)")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = run(args.payload_mb, args.max_mib)
    width = max(len(r.attack) for r in rows)
    print(f"{'attack':<{width}}  rejected  honest ok  peak RSS MB  seconds")
    for r in rows:
        mark = "*" if r.in_process else " "
        print(
            f"{r.attack:<{width}}  {r.rejected:>8}  {'yes' if r.honest else 'NO':>9}  "
            f"{r.rss_mb:>10.1f}{mark}  {r.seconds:>7.3f}"
        )
    print(
        f"(* measured in the process hosting every peer; total {time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
