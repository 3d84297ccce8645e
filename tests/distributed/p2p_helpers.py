"""Shared helpers for the Lattica tests (tests/distributed/test_p2p.py, tests/faults) and
scripts/bench_hostile_peers.py: real peers on 127.0.0.1, a raw hostile sender, and a
receiver in its own process whose peak RSS is measured.

``python -m tests.distributed.p2p_helpers`` is the receiver process (see
:func:`measure_receiver`); it speaks one JSON line at a time on stdin/stdout.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sedma_torch.distributed.p2p import TensorPeer

REPO = Path(__file__).resolve().parents[2]
KEY = b"training-group-secret"
SERVICE = "SedmaTensorService.fetch"

try:
    import lattica  # noqa: F401

    LATTICA_ERROR = None
except Exception as exc:  # pragma: no cover - environment dependent
    LATTICA_ERROR = f"{type(exc).__name__}: {exc}"

needs_lattica = pytest.mark.skipif(
    LATTICA_ERROR is not None, reason=f"Lattica cannot run: {LATTICA_ERROR}"
)


def until(predicate, timeout_s=10.0):
    """Poll ``predicate`` until it returns something truthy (or the time is up)."""
    limit = time.monotonic() + timeout_s
    while time.monotonic() < limit:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def counters(peer: TensorPeer) -> dict[str, int]:
    """A snapshot of ``peer``'s :class:`P2PStats` counters."""
    return dataclasses.asdict(peer.stats)


def make_group(n: int, *, key: bytes | None = KEY, bootstrap: str | None = None, **kwargs):
    """``n`` real peers that admit each other (the first is the bootstrap unless given)."""
    first = TensorPeer(bootstrap=[bootstrap] if bootstrap else [], group_key=key, **kwargs)
    peers = [first]
    for _ in range(n - 1):
        peers.append(TensorPeer(bootstrap=[bootstrap or first.address], group_key=key, **kwargs))
    ids = [p.peer_id for p in peers]
    for p in peers:
        p.add_members(ids)
    return peers


def raw_call(sender: TensorPeer, target: str, request: bytes, timeout: int = 10) -> bytes:
    """Send raw request bytes from ``sender``'s node to ``target``'s tensor service (what a
    hostile peer can do with any Lattica node); the raw response frame."""
    client = sender._node.get_client(target)
    return bytes(client.call(SERVICE, request).result(timeout))


class LyingMember(TensorPeer):
    """A hostile *member*: its headers are honest, but each chunk it serves carries
    ``extra`` junk bytes past the requested length."""

    extra = 1024

    def _serve_body(self, req):
        frame = super()._serve_body(req)
        return frame + b"\0" * self.extra


def flood_records(attacker: TensorPeer, key: str, count: int = 1100) -> int:
    """Store up to ``count`` junk subkeys under ``key`` with an expiry ~11 days ahead, until
    the DHT refuses (``MaxRecords``); returns how many were stored."""
    stored = 0
    for i in range(count):
        try:
            attacker._node._lattica_instance.store_with_subkey(
                key, b"junk" * 8, time.time() + 1e6, f"junk-{i}"
            )
        except Exception:  # Lattica raises RuntimeWarning("Failed to store: MaxRecords")
            break
        stored += 1
    return stored


# ----- a receiver in its own process (peak RSS) ---------------------------------------
def measure_receiver(
    publisher: TensorPeer,
    cid: str,
    *,
    key: bytes,
    max_bytes: int,
    vias=("rpc", "bitswap"),
    timeout_s: float = 120.0,
) -> dict:
    """Start a receiving peer in a fresh process (a member of ``publisher``'s group with
    ``max_bytes``), have it fetch ``cid`` by each of ``vias`` and return its report: per
    fetch the outcome, the seconds it took and ``peak_growth_mb`` (the process's peak RSS
    during the fetch, ``VmHWM`` reset just before it, minus its RSS just before), plus the
    receiver's :class:`P2PStats`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.distributed.p2p_helpers"],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        cfg = {
            "bootstrap": publisher.address,
            "publisher": publisher.peer_id,
            "key": key.hex(),
            "max_bytes": max_bytes,
        }
        proc.stdin.write(json.dumps(cfg) + "\n")
        proc.stdin.flush()
        hello = proc.stdout.readline()
        if not hello:
            raise RuntimeError(f"receiver died: {proc.stderr.read()[-3000:]}")
        publisher.add_members([json.loads(hello)["peer_id"]])
        proc.stdin.write(json.dumps({"cid": cid, "via": list(vias)}) + "\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=timeout_s)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"receiver failed ({proc.returncode}): {err[-3000:]}")
        return json.loads(lines[-1])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak RSS of this process's address space (``VmHWM``; ``ru_maxrss`` elsewhere, which
    on Linux also carries the parent's peak across fork/exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); harmless where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _receiver_main() -> None:
    cfg = json.loads(sys.stdin.readline())
    peer = TensorPeer(
        bootstrap=[cfg["bootstrap"]],
        members=[cfg["publisher"]],
        group_key=bytes.fromhex(cfg["key"]),
        max_bytes=cfg["max_bytes"],
        cache_mb=0,
    )
    print(json.dumps({"peer_id": peer.peer_id}), flush=True)
    job = json.loads(sys.stdin.readline())
    until(lambda: peer.providers(job["cid"]), 20.0)
    results = []
    for via in job["via"]:
        gc.collect()
        reset_peak_rss()
        rss_before, peak_before = current_rss(), peak_rss()
        start = time.perf_counter()
        try:
            peer.fetch(job["cid"], via=via)
            outcome = "accepted"
        except LookupError:
            outcome = "rejected"
        except Exception as exc:  # reported, not hidden
            outcome = f"error: {type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - start
        results.append(
            {
                "via": via,
                "outcome": outcome,
                "seconds": seconds,
                "peak_growth_mb": (peak_rss() - rss_before) / 1e6,
                "peak_gap_before_mb": (peak_before - rss_before) / 1e6,
            }
        )
    report = {"results": results, "stats": dataclasses.asdict(peer.stats)}
    peer.close()
    print(json.dumps(report), flush=True)


def _provider_main() -> None:
    """A provider in its own process (``python -m tests.distributed.p2p_helpers provider``),
    so a test can kill it with SIGKILL. Protocol, one JSON line each: in ``{bootstrap, key,
    n, seed, request_timeout_s}``; out ``{peer_id}``; in ``{members}``; out ``{cid}`` once
    it has published the seeded tensor ``randn(n)`` and its telemetry; then it serves until
    stdin closes."""
    cfg = json.loads(sys.stdin.readline())
    peer = TensorPeer(
        bootstrap=[cfg["bootstrap"]],
        group_key=bytes.fromhex(cfg["key"]),
        cache_mb=0,
        request_timeout_s=cfg.get("request_timeout_s", 10),
    )
    print(json.dumps({"peer_id": peer.peer_id}), flush=True)
    peer.add_members(json.loads(sys.stdin.readline())["members"])
    import torch

    tensor = torch.randn(cfg["n"], generator=torch.Generator().manual_seed(cfg["seed"]))
    cid = peer.publish(tensor)
    peer.publish_telemetry()
    print(json.dumps({"cid": cid}), flush=True)
    sys.stdin.read()  # serve until the test closes stdin (or kills this process)
    peer.close()


class ProviderProcess:
    """A :func:`_provider_main` peer in a child process (see there)."""

    def __init__(self, bootstrap: str, *, key: bytes, n: int, seed: int, timeout_s: int = 10):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.distributed.p2p_helpers", "provider"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        cfg = {"bootstrap": bootstrap, "key": key.hex(), "n": n, "seed": seed}
        cfg["request_timeout_s"] = timeout_s
        self.peer_id = self._send_and_read(cfg)["peer_id"]

    def _send_and_read(self, message: dict) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            raise RuntimeError(f"provider died: {self.proc.stderr.read()[-3000:]}")
        return json.loads(line)

    def publish(self, members: list[str]) -> str:
        """Admit ``members`` and publish; the content id."""
        return self._send_and_read({"members": members})["cid"]

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no close(), no goodbye to the DHT
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()


if __name__ == "__main__":
    if sys.argv[1:] == ["provider"]:
        _provider_main()
    else:
        _receiver_main()
