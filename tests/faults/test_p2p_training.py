"""``python train.py distributed=p2p`` with real peers on 127.0.0.1: a peer joining a running
group with one command (bootstrap address + group key), a peer killed with SIGKILL during
training, and a non-member offering a poisoned update. Every check reads what the peers
wrote (``results.json``, ``peers/peer<i>.json``) and recomputes what it can independently."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sedma_torch.distributed.p2p import TensorPeer
from sedma_torch.experiments.p2p_train import P2P_KEY_ENV, average, encode_record
from tests.distributed.p2p_helpers import REPO, needs_lattica, until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240), needs_lattica]

FAST = [
    "logger=none",
    "memory=none",
    "distributed.local_steps=5",
    "distributed.round_timeout_s=8",
    "distributed.request_timeout_s=2",
    "distributed.join_timeout_s=60",
]


def _train(run_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", "distributed=p2p", f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(
        [*cmd, *FAST, *overrides],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 180, run_dir: Path | None = None) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(
            f"train.py distributed=p2p did not end within {timeout} s:\n{out[-3000:]}"
            + _peer_logs(run_dir)
        )
    assert proc.returncode == 0, out[-3000:] + _peer_logs(run_dir)
    return out


def _peer_logs(run_dir: Path | None) -> str:
    """The end of each peer's log (its rounds; with ``kill -USR1`` its threads' stacks)."""
    logs = sorted((run_dir / "peers").glob("peer*.log")) if run_dir is not None else []
    return "".join(f"\n--- {log.name}:\n{log.read_text()[-1500:]}" for log in logs)


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())["distributed"]


def _by_index(section: dict) -> dict[int, dict]:
    return {p["index"]: p for p in section["peers"]}


def test_average_is_the_float64_mean_in_any_order():
    gen = torch.Generator().manual_seed(7)
    vecs = {f"c{i}": torch.randn(1000, generator=gen) for i in range(4)}
    reference = torch.stack([v.double() for v in vecs.values()]).mean(0).float()
    shuffled = dict(reversed(list(vecs.items())))
    assert torch.allclose(average(vecs), reference, atol=1e-7)
    assert torch.equal(average(vecs), average(shuffled))  # same bytes on every peer


# 1-3 min on a loaded 2-core machine (37-158 s measured with a CPU hog running): a
# 2-peer group, then a joiner given its bootstrap address. Every wait inside is bounded
# (DHT lookups included); the launchers kill a peer still running after launch_timeout_s,
# before the test gives up
@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_peer_joins_running_group_with_bootstrap_address(tmp_path):
    group = tmp_path / "group"
    # the group outlasts the joiner's start-up (tens of seconds on a loaded machine)
    rounds = [
        "distributed.rounds=60",
        "distributed.local_steps=50",
        "distributed.launch_timeout_s=420",
    ]
    first = _train(group, "distributed.peers=2", *rounds)
    try:
        assert until(lambda: (group / "p2p_bootstrap.txt").is_file(), 180)
        address = (group / "p2p_bootstrap.txt").read_text().strip()
        key = (group / "p2p_group_key").read_text().strip()
        # started now, the joiner finds the group's first averages once it is up (it waits
        # for them at most join_timeout_s) and joins after them
        joiner = _train(
            tmp_path / "joiner",
            f"distributed.bootstrap={address}",
            "distributed.peers=1",
            *rounds,
            env={P2P_KEY_ENV: key},
        )
        _finish(joiner, 480, tmp_path / "joiner")
    finally:
        _finish(first, 480, group)
    section, late = _results(group), _results(tmp_path / "joiner")
    founders = _by_index(section)
    (newcomer,) = late["peers"]
    join = newcomer["join"]
    assert join["cid"] is not None and newcomer["joined_at_round"] == join["round"] + 1 > 0
    heads = {
        r["head"] for p in founders.values() for r in p["rounds"] if r["round"] == join["round"]
    }
    assert join["cid"] in heads  # it started from the group's average of that round
    assert set(join["providers"]) <= {p["peer_id"] for p in founders.values()}
    # after joining it averages with the founders and they with it
    assert any(r["chosen"] for r in newcomer["rounds"])
    assert any(newcomer["peer_id"] in r["chosen"] for p in founders.values() for r in p["rounds"])
    assert section["finished"] == [0, 1] and newcomer["top1"] > 0.5


def test_killed_peer_stops_being_selected_and_others_finish(tmp_path):
    run = tmp_path / "run"
    proc = _train(run, "distributed.peers=3", "distributed.rounds=7")
    try:
        victim = run / "peers" / "peer2.round"
        assert until(lambda: victim.is_file() and int(victim.read_text()) >= 1, 120)
        pid = int((run / "peers" / "peer2.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        killed_round = int(victim.read_text())
    finally:
        out = _finish(proc)
    section = _results(run)
    peers = _by_index(section)
    assert section["finished"] == [0, 1] and section["lost"] == [2], out[-2000:]
    dead = peers[2]["peer_id"]
    assert peers[2]["exit_code"] == -signal.SIGKILL
    for i, other in ((0, 1), (1, 0)):
        rounds = peers[i]["rounds"]
        survivor = peers[other]["peer_id"]
        assert [r["round"] for r in rounds] == list(range(7))  # nobody stopped
        # selected at most up to the round after the one it was killed in, never later
        late = [r for r in rounds if r["round"] > killed_round + 2]
        assert late and all(dead not in r["chosen"] and dead not in r["posted"] for r in late)
        # every round after the kill averages with the other survivor (a record or a
        # provider the DHT misses is asked from its author), each within one round
        # deadline plus the fetch window (round 0 also waits for the start-up of the others)
        after = [r for r in rounds if r["round"] > killed_round]
        missed = [r["round"] for r in after if survivor not in r["chosen"]]
        assert not missed, f"peer {i} averaged without peer {other} in rounds {missed}"
        assert max(r["round_s"] for r in rounds[1:]) < 8 + 5 + 2 * 2 + 5
        assert peers[i]["top1"] > 0.5
    assert time.monotonic() - killed_at < 150


def test_non_member_poisoned_update_is_never_used(tmp_path):
    run = tmp_path / "run"
    proc = _train(run, "distributed.peers=2", "distributed.rounds=6", "distributed.k=2")
    hostile = None
    poison = torch.full((9930,), 1e6)
    try:
        assert until(lambda: (run / "p2p_bootstrap.txt").is_file(), 60)
        address = (run / "p2p_bootstrap.txt").read_text().strip()
        hostile = TensorPeer(bootstrap=[address], group_key=b"not-the-group-key", cache_mb=0)
        cid = hostile.publish(poison)
        wrong = b"w" * 32
        for r in range(6):  # offers a "round record" for every round, signed with another key
            raw = encode_record(
                wrong, {"round": r, "cid": cid, "peer": hostile.peer_id, "group": "sedma-digits"}
            )
            hostile.store_record(f"sedma/p2p/sedma-digits/round/{r}", raw, time.time() + 600)
        raw = encode_record(
            wrong, {"round": 5, "cid": cid, "peer": hostile.peer_id, "group": "sedma-digits"}
        )
        hostile.store_record("sedma/p2p/sedma-digits/head", raw, time.time() + 600)
        _finish(proc)
        served = hostile.stats.served_bytes
    finally:
        if proc.poll() is None:
            proc.kill()
        if hostile is not None:
            hostile.close()
    section = _results(run)
    assert served == 0
    for p in section["peers"]:
        assert p["rejected_records"] > 0  # the offers were seen in the DHT and refused
        for r in p["rounds"]:
            assert hostile.peer_id not in r["posted"] + r["chosen"] + r["ranked"]
        state = torch.load(run / "peers" / f"peer{p['index']}.pt", weights_only=True)
        flat = torch.cat([v.flatten() for v in state.values() if v.is_floating_point()])
        assert flat.abs().max() < 1e3 and p["top1"] > 0.5  # the 1e6 poison never got in
