"""Provider selection over heterogeneous links: Eq. 7 vs random vs DHT-only (XOR-closest).

    python scripts/bench_p2p.py                       # as root: namespaces + veth + tc tbf
    python scripts/bench_p2p.py --rounds 10 --mb 4 --rates 400,80,16

Links: every provider runs in its own network namespace, joined to a bridge in the root
namespace by a veth pair whose namespace end is rate-limited with ``tc qdisc ... tbf``
(its upload: what it serves). The namespaces, veths and the bridge are made here and
removed at the end (also on an error). ``netem`` is not used (not available on these
machines). Without ``ip netns``/``tc`` (not root, no iproute2) the script says so and
exits with code 2: it does not fall back to an application-level throttle.

Task: an averaging round of ``train.py distributed=p2p`` — every round the providers hold
the same parameter vector (``--mb`` MB of float32, one content id, as peers that averaged
the same set do), and the requester in the root namespace (a :class:`TensorPeer`, k = 1)
fetches it from one provider chosen by each strategy:

* ``eq7``: :meth:`TensorPeer.rank_providers` (DHT provider lookup, Eq. 7 from the
  telemetry the providers publish in the DHT and Lattica's RTT; Eq. 8 updates every round);
* ``random``: a uniformly random provider (seeded);
* ``xor``: the provider whose peer id is XOR-closest to the content id (SHA-256 of both, as
  Kademlia orders a key's providers): the libp2p/DHT-only baseline.

Each round first fetches from every provider once (the measured times; "fastest" is the
one that was fastest in that measurement), then once per strategy. Columns: mean and p90
time per round, bytes per provider per hour of rounds (the most loaded provider), and
selection accuracy (fraction of rounds the strategy chose that round's measured-fastest
provider). The cache is off (every round is a new content id, so a cache cannot change
which provider is picked; the utility cache is benchmarked in scripts/bench_cache.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SUBNET = "10.217.{}.{}"
B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def namespaces_available() -> str | None:
    """None when namespaces + veth + tbf work here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) not installed"
    probe = f"sp17probe{os.getpid() % 10000}"
    try:
        _sh("ip", "netns", "add", probe)
        _sh("ip", "link", "add", f"{probe}a", "type", "veth", "peer", "name", f"{probe}b")
        _sh("tc", "qdisc", "add", "dev", f"{probe}a", "root", "tbf", "rate", "10mbit",
            "burst", "32kbit", "latency", "50ms")  # fmt: skip
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"namespaces/tbf failed: {getattr(exc, 'stderr', '') or exc}".strip()
    finally:
        subprocess.run(["ip", "link", "del", f"{probe}a"], capture_output=True)
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Links:
    """A bridge in the root namespace and one rate-limited namespace per provider."""

    def __init__(self, rates_mbit: list[float]) -> None:
        tag = os.getpid() % 10000
        self.bridge = f"sp17br{tag}"
        self.names = [f"sp17ns{tag}_{i}" for i in range(len(rates_mbit))]
        self.veths = [f"sp17v{tag}_{i}" for i in range(len(rates_mbit))]
        self.host_ip = SUBNET.format(tag % 250, 1)
        self.ips = [SUBNET.format(tag % 250, 10 + i) for i in range(len(rates_mbit))]
        self.rates = rates_mbit
        self._made: list[tuple[str, ...]] = []

    def __enter__(self) -> Links:
        try:
            _sh("ip", "link", "add", self.bridge, "type", "bridge")
            self._made.append(("ip", "link", "del", self.bridge))
            _sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
            _sh("ip", "link", "set", self.bridge, "up")
            for ns, veth, ip, rate in zip(
                self.names, self.veths, self.ips, self.rates, strict=True
            ):
                _sh("ip", "netns", "add", ns)
                self._made.append(("ip", "netns", "del", ns))
                _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}n")
                self._made.append(("ip", "link", "del", veth))
                _sh("ip", "link", "set", f"{veth}n", "netns", ns)
                _sh("ip", "link", "set", veth, "master", self.bridge)
                _sh("ip", "link", "set", veth, "up")
                _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
                _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", f"{veth}n")
                _sh("ip", "netns", "exec", ns, "ip", "link", "set", f"{veth}n", "up")
                _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", f"{veth}n", "root",
                    "tbf", "rate", f"{rate}mbit", "burst", "64kb", "latency", "100ms")  # fmt: skip
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for cmd in reversed(self._made):
            subprocess.run(cmd, capture_output=True)
        self._made.clear()


# ----- a provider (in its namespace) ---------------------------------------------------
def _provider_main() -> None:
    import torch

    from sedma_torch.distributed.p2p import TensorPeer

    cfg = json.loads(sys.stdin.readline())
    peer = TensorPeer(
        host=cfg["host"],
        bootstrap=[cfg["bootstrap"]],
        group_key=bytes.fromhex(cfg["key"]),
        cache_mb=0,
        bitswap=False,
        max_bytes=2**30,
    )
    print(json.dumps({"peer_id": peer.peer_id}), flush=True)
    for line in sys.stdin:  # {"members": [...]} or {"seed": s}; stdin closed: exit
        msg = json.loads(line)
        if "members" in msg:
            peer.add_members(msg["members"])
            print("{}", flush=True)
            continue
        gen = torch.Generator().manual_seed(msg["seed"])
        cid = peer.publish(torch.randn(msg["n"], generator=gen))
        peer.publish_telemetry()
        print(json.dumps({"cid": cid}), flush=True)
    peer.close()


class Provider:
    def __init__(self, ns: str, host: str, bootstrap: str, key: bytes) -> None:
        cmd = ["ip", "netns", "exec", ns, sys.executable, __file__, "--provider"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RUST_LOG": "off"}
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
        )
        self.peer_id = self.ask({"host": host, "bootstrap": bootstrap, "key": key.hex()})["peer_id"]

    def ask(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("provider died")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def _b58decode(text: str) -> bytes:
    num = 0
    for ch in text:
        num = num * 58 + B58.index(ch)
    raw = num.to_bytes((num.bit_length() + 7) // 8, "big")
    return b"\0" * (len(text) - len(text.lstrip("1"))) + raw


def xor_closest(providers: list[str], cid: str) -> str:
    """The provider whose SHA-256(peer id bytes) is XOR-closest to SHA-256(cid)."""
    target = int.from_bytes(hashlib.sha256(cid.encode()).digest(), "big")

    def distance(p: str) -> int:
        return int.from_bytes(hashlib.sha256(_b58decode(p)).digest(), "big") ^ target

    return min(providers, key=distance)


def run(args: argparse.Namespace) -> dict:
    import torch

    from sedma_torch.distributed.p2p import TensorPeer

    rates = [float(r) for r in args.rates.split(",")]
    key = os.urandom(32)
    n = int(args.mb * 2**20 / 4)
    rng = random.Random(args.seed)
    with Links(rates) as links:
        me = TensorPeer(
            host=links.host_ip, group_key=key, cache_mb=0, bitswap=False, k=1,
            max_bytes=2**30, request_timeout_s=60,
        )  # fmt: skip
        providers = []
        try:
            for ns, ip in zip(links.names, links.ips, strict=True):
                providers.append(Provider(ns, ip, me.address, key))
            ids = [p.peer_id for p in providers]
            me.add_members(ids)
            for p in providers:
                p.ask({"members": [me.peer_id, *ids]})
            me.publish_telemetry()
            rows = {s: {"times": [], "correct": 0, "bytes": dict.fromkeys(ids, 0)} for s in
                    ("eq7", "random", "xor")}  # fmt: skip
            measured_all = []
            rtts: list[dict] = []
            for r in range(args.rounds):
                cids = {p.ask({"seed": 1000 + r, "n": n})["cid"] for p in providers}
                assert len(cids) == 1, "providers must hold the same vector"
                (cid,) = cids
                deadline = time.monotonic() + 30
                while set(me.providers(cid)) != set(ids) and time.monotonic() < deadline:
                    time.sleep(0.1)
                measured = {}
                for pid in ids:
                    t0 = time.perf_counter()
                    assert me._fetch_from(pid, cid, (n,), torch.float32, "rpc") is not None
                    measured[pid] = time.perf_counter() - t0
                measured_all.append(measured)
                fastest = min(measured, key=measured.get)
                ranked = me.rank_providers(cid)
                rtts.append(
                    {rates[ids.index(p)]: f.latency_ms for p, f in me._last_candidates.items()}
                )
                me.selector.update_weights()
                choice = {
                    "eq7": ranked[0] if ranked else rng.choice(ids),
                    "random": rng.choice(ids),
                    "xor": xor_closest(me.providers(cid) or ids, cid),
                }
                for name, pid in choice.items():
                    t0 = time.perf_counter()
                    assert me._fetch_from(pid, cid, (n,), torch.float32, "rpc") is not None
                    rows[name]["times"].append(time.perf_counter() - t0)
                    rows[name]["bytes"][pid] += n * 4
                    rows[name]["correct"] += pid == fastest
                print(
                    f"round {r}: measured "
                    + ", ".join(f"{rates[ids.index(p)]:g} Mbit/s {t:.2f} s" for p, t in measured.items())
                    + " | chose "
                    + ", ".join(f"{k} {rates[ids.index(v)]:g}" for k, v in choice.items()),
                    flush=True,
                )  # fmt: skip
        finally:
            for p in providers:
                p.close()
            me.close()
    out = {"rates_mbit": rates, "mb": args.mb, "rounds": args.rounds, "strategies": {}}
    for name, row in rows.items():
        times = sorted(row["times"])
        hours = sum(times) / 3600
        out["strategies"][name] = {
            "mean_s": statistics.mean(times),
            "p90_s": times[min(len(times) - 1, int(0.9 * len(times)))],
            "max_provider_mb_per_hour": max(row["bytes"].values()) / 1e6 / hours,
            "accuracy": row["correct"] / len(times),
            "chosen_rates": {
                f"{rates[ids.index(p)]:g}": b // (n * 4) for p, b in row["bytes"].items()
            },
        }
    out["weights_after"] = me.selector.weights.tolist()
    out["rtt_ms"] = rtts
    out["measured_s"] = [
        {f"{rates[ids.index(p)]:g}": t for p, t in m.items()} for m in measured_all
    ]
    return out


def main() -> int:
    if "--provider" in sys.argv:
        _provider_main()
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--mb", type=float, default=4.0, help="vector size in MB")
    ap.add_argument("--rates", default="400,80,16", help="provider upload rates, Mbit/s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    why = namespaces_available()
    if why is not None:
        print(f"bench_p2p: network namespaces unavailable ({why}); not measured", file=sys.stderr)
        return 2
    print("links: network namespaces + veth + tc tbf (made and removed by this script)")
    out = run(args)
    print("\n| selection | time per round mean (s) | p90 (s) | most loaded provider (MB/h) "
          "| accuracy | rounds per provider (Mbit/s: n) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, row in out["strategies"].items():
        print(
            f"| {name} | {row['mean_s']:.3f} | {row['p90_s']:.3f} | "
            f"{row['max_provider_mb_per_hour']:.0f} | {row['accuracy']:.2f} | "
            + ", ".join(f"{k}: {v}" for k, v in row["chosen_rates"].items())
            + " |"
        )
    print(f"\nEq. 7 weights after the run: {[round(w, 4) for w in out['weights_after']]}")
    print("Lattica RTT (ms) per provider rate (Mbit/s), per round:", out["rtt_ms"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
