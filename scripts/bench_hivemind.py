"""Side by side: hivemind (``hivemind.Optimizer``, local updates) vs ``train.py distributed=p2p``.

    /work/hm-venv/bin/python scripts/bench_hivemind.py                 # all four experiments
    /work/hm-venv/bin/python scripts/bench_hivemind.py --only base     # time to target, bytes
    /work/hm-venv/bin/python scripts/bench_hivemind.py --main-python /usr/bin/python3
    /work/hm-venv/bin/python scripts/bench_hivemind.py --systems hivemind --only base \
        --target-group-size 3 --blocking-averaging --target 0.10   # hivemind variants
    python scripts/bench_hivemind.py --resummarize results/bench_hivemind.json  # table again

Run it with the Python of a virtual environment that has ``hivemind`` (its pins clash with
this project's); ``train.py distributed=p2p`` is launched with the project's own Python
(``--main-python``, or ``$SEDMA_MAIN_PYTHON``, else the first ``python3``/``python`` on
PATH that imports ``sedma_torch``).

Same task for both: train.py's digits CNN (``small_cnn``, the initial parameters of
``seed_everything(seed); build_model(...)``, made by the project's Python and handed to the
hivemind peers in a file), the digits split of ``load_digits_split`` (1,400 train images),
shard ``i`` = every ``shards``-th image from ``i``, batches 64 shuffled per epoch with the
seed ``seed * 1000 + shard`` (as ``p2p_train._batches``), Adam lr 3e-3, local state only,
``rounds x local_steps`` optimiser steps per peer, ``N`` peers on 127.0.0.1 (loopback, no
rate limits). hivemind: ``Optimizer(use_local_updates=True, target_batch_size = N x H x
batch)`` -- one epoch, hence one parameter averaging (all-reduce of the parameters, Adam
statistics not averaged), per H local steps of every peer; the first peer starts the DHT,
the others get its visible multiaddrs as ``initial_peers``; matchmaking_time 5 s,
averaging_timeout 20 s (our round_timeout_s); by default hivemind's own defaults otherwise
(averaging in the background: ``delay_state_averaging=True``, ``target_group_size=None``),
``--blocking-averaging`` and ``--target-group-size N`` change those two. The hivemind peers
start stepping once all founders are up (a barrier, bounded; ours waits for the peers
started with it in its first round). Ours: ``train.py distributed=p2p`` with its config
defaults (k 2, round_timeout_s 20, join_timeout_s 30) and ``logger=none memory=none``.

Measured (all wall clock, seconds from the launch of the run, machine shared):

* startup: launch to the first H-step window any peer ended; ``tgt-1st``: time to target
  minus that (start-up excluded). ``avg ok``: per peer, averaging rounds that averaged
  with at least one other peer (hivemind: ``Averaged parameters with`` lines of its
  verbose log; ours: rounds with a non-empty ``chosen``).
* ``time_to_target_s``: first time at which every peer's training loss, averaged over a
  window of H local steps (our round loss), is <= the target. Ours: the moment the
  benchmark sees the peer's ``round r loss`` line in its log (polled every 0.2 s);
  hivemind: the peer's own timestamp at the end of each H-step window. The target is the
  largest peer loss of our baseline run at round ``2/3 x rounds`` (rounded up to 0.05)
  unless ``--target`` is given.
* ``bytes_sent_per_peer``: TCP payload bytes the peer's processes sent (socket
  ``bytes_sent`` of ``ss -tinp``, sampled every 0.5 s, max per socket, summed; a peer's
  processes are its process and its descendants: hivemind's ``p2pd`` daemon and averager
  process; ours is one process with Lattica inside). It includes DHT traffic, transport
  encryption and framing; sockets that open and close between two samples are missed
  (an undercount). Ours also reports ``served_bytes`` (tensor payload served over RPC).
* kill: peer N-1 gets SIGKILL (its whole process group) after its 4th window/round; do
  the others finish all their steps, and their finish time against the baseline's.
* late join: N-1 peers start, one more after the founders' 3rd window/round: seconds from
  its launch until it holds the group's parameters (hivemind: ``load_state_from_peers``
  returned; ours: its node's address file appeared + ``join.seconds`` of its report, the
  fetch of the latest round's average by content id) and the duration of that load alone.

Writes ``results/bench_hivemind.json`` and prints a table. Every wait has a deadline and
every process started here is killed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PREP = r"""
import sys, torch
from omegaconf import OmegaConf
from sedma_torch.experiments.builders import build_model, seed_everything
from sedma_torch.experiments.training import _train_data
seed = int(sys.argv[2])
cfg = OmegaConf.to_container(OmegaConf.load("configs/model/small_cnn.yaml"))
data = OmegaConf.to_container(OmegaConf.load("configs/dataset/digits.yaml"))
seed_everything(seed)  # as p2p_train.run_peer: the same initial parameters on every peer
model = build_model(cfg, for_training=True)
train, test = _train_data(data)
torch.save({"init": model.state_dict(), "train": train.tensors, "test": test.tensors,
            "channels": list(cfg["channels"]), "num_classes": int(cfg["num_classes"])},
           sys.argv[1])
"""


# ----- the hivemind peer (a subprocess of this script) --------------------------------
def _small_cnn():
    import importlib.util

    path = REPO / "sedma_torch" / "models" / "small_cnn.py"  # torch only, no package import
    spec = importlib.util.spec_from_file_location("_bench_small_cnn", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.small_cnn


def _batches(dataset, batch_size: int, seed: int):
    """As ``p2p_train._batches``: endless batches, epoch ``e`` shuffled by ``seed + e``."""
    import torch
    from torch.utils.data import DataLoader

    for epoch in range(10**9):
        gen = torch.Generator().manual_seed(seed + epoch)
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen)


def hivemind_peer(a: argparse.Namespace) -> None:
    import functools

    import hivemind
    import torch
    from torch import nn
    from torch.utils.data import Subset, TensorDataset

    torch.set_num_threads(1)
    out = Path(a.out)
    task = torch.load(a.task, weights_only=True)
    model = _small_cnn()(task["num_classes"], tuple(task["channels"]))
    model.load_state_dict(task["init"])
    train = TensorDataset(*task["train"])
    shard = a.index % a.shards
    shard_set = Subset(train, list(range(shard, len(train), a.shards)))
    batches = _batches(shard_set, a.batch_size, a.seed * 1000 + shard)
    initial = [m for m in a.initial_peers.split(",") if m]
    dht = hivemind.DHT(
        start=True, initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"], daemon=True
    )
    maddrs = [str(m) for m in dht.get_visible_maddrs()]
    (out / f"hm{a.index}.maddrs").write_text(",".join(maddrs) + "\n")
    opt = hivemind.Optimizer(
        dht=dht,
        run_id=a.run_id,
        params=model.parameters(),
        optimizer=functools.partial(torch.optim.Adam, lr=a.lr),
        batch_size_per_step=a.batch_size,
        target_batch_size=a.target_batch_size,
        use_local_updates=True,
        matchmaking_time=a.matchmaking_time,
        averaging_timeout=a.averaging_timeout,
        delay_state_averaging=not a.blocking_averaging,
        averager_opts={"target_group_size": a.target_group_size} if a.target_group_size else None,
        verbose=True,  # logs each averaging round (counted by the benchmark)
    )
    log = open(out / f"hm{a.index}.jsonl", "a")  # noqa: SIM115 - closed below

    def emit(**row):
        log.write(json.dumps({"t": time.time(), **row}) + "\n")
        log.flush()

    if a.late:
        t0 = time.time()
        opt.load_state_from_peers()
        init = torch.cat([v.flatten() for v in task["init"].values()])
        now = nn.utils.parameters_to_vector(model.parameters()).detach()
        emit(
            event="joined",
            load_s=time.time() - t0,
            epoch=int(opt.local_epoch),
            changed=bool(not torch.equal(init, now)),
        )
    emit(event="ready", epoch=int(opt.local_epoch))
    (out / f"hm{a.index}.ready").write_text("1\n")
    # start barrier (ours: the first round waits up to join_timeout_s for the peers started
    # with it): founders start stepping once all founders are up, bounded
    founders = a.n_total - 1 if a.founders_only else a.n_total
    deadline = time.monotonic() + a.barrier_s
    while not a.late and time.monotonic() < deadline:
        if all((out / f"hm{i}.ready").is_file() for i in range(founders)):
            break
        time.sleep(0.1)
    emit(event="start", epoch=int(opt.local_epoch))
    losses = []
    for step in range(a.steps):
        x, y = next(batches)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if len(losses) == a.local_steps:
            emit(
                event="window", step=step + 1, loss=sum(losses) / len(losses), epoch=opt.local_epoch
            )
            losses = []
    model.eval()
    tx, ty = task["test"]
    with torch.no_grad():
        top1 = float((model(tx).argmax(1) == ty).float().mean())
    emit(event="done", top1=top1, epoch=int(opt.local_epoch))
    (out / f"hm{a.index}.done").write_text("1\n")
    # keep serving (averaging, state) until the others are done too, bounded
    deadline = time.monotonic() + a.linger_s
    while time.monotonic() < deadline:
        if all((out / f"hm{i}.done").is_file() for i in range(a.n_total)):
            break
        time.sleep(0.2)
    log.close()
    opt.shutdown()
    dht.shutdown()
    os._exit(0)  # hivemind's background threads can hold the interpreter


# ----- measurement helpers --------------------------------------------------------------
def _children() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                out[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


class SocketBytes:
    """Per-peer TCP bytes sent, from ``ss -tinpH`` samples (see the module docstring)."""

    USERS = re.compile(r"pid=(\d+)")
    SENT = re.compile(r"bytes_sent:(\d+)")
    RECV = re.compile(r"bytes_received:(\d+)")

    def __init__(self, interval: float = 0.5) -> None:
        self.roots: dict[int, str] = {}  # root pid -> peer label
        self.sockets: dict[tuple[str, str, str], list[int]] = {}
        self.interval = interval
        self.stop = threading.Event()
        self.samples = 0
        self.available = shutil.which("ss") is not None
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def track(self, pid: int, label: str) -> None:
        self.roots[pid] = label

    def start(self) -> SocketBytes:
        if self.available:
            self.thread.start()
        return self

    def _owner(self, parents: dict[int, int]) -> dict[int, str]:
        owner = dict(self.roots)
        for _ in range(8):  # descendants, a few levels
            for pid, ppid in parents.items():
                if pid not in owner and ppid in owner:
                    owner[pid] = owner[ppid]
        return owner

    def sample(self) -> None:
        try:
            text = subprocess.run(
                ["ss", "-tinpH"], capture_output=True, text=True, timeout=10
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return
        self.parse(text, self._owner(_children()))

    def parse(self, text: str, owner: dict[int, str]) -> None:
        """One ``ss -tinpH`` listing: a socket line, then its indented info line."""
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if line[:1].isspace() or "users:" not in line:
                continue
            fields = line.split()
            info = lines[i + 1] if i + 1 < len(lines) and lines[i + 1][:1].isspace() else ""
            label = next((owner[int(p)] for p in self.USERS.findall(line) if int(p) in owner), None)
            if label is None or len(fields) < 5:
                continue
            sent = self.SENT.search(info)
            recv = self.RECV.search(info)
            key = (label, fields[3], fields[4])
            row = self.sockets.setdefault(key, [0, 0])
            row[0] = max(row[0], int(sent.group(1)) if sent else 0)
            row[1] = max(row[1], int(recv.group(1)) if recv else 0)
        self.samples += 1

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)

    def finish(self) -> dict[str, dict[str, int]]:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=15)
        out: dict[str, dict[str, int]] = {}
        for (label, _l, _r), (sent, recv) in self.sockets.items():
            row = out.setdefault(label, {"sent": 0, "received": 0, "sockets": 0})
            row["sent"] += sent
            row["received"] += recv
            row["sockets"] += 1
        return out


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _until(pred, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def time_to_target(curves: dict[str, list[tuple[float, float]]], target: float) -> dict:
    """curves: peer -> [(seconds since launch, window loss)]. ``all_peers_s``: when the last
    peer got there; ``from_first_window_s``: the same from the first window any peer ended
    (start-up and the first barrier excluded)."""
    per = {}
    for peer, rows in curves.items():
        per[peer] = next((t for t, loss in rows if loss <= target), None)
    reached = [t for t in per.values() if t is not None]
    first = min(rows[0][0] for rows in curves.values() if rows)
    every = max(reached) if reached and len(reached) == len(per) else None
    return {
        "per_peer_s": per,
        "all_peers_s": every,
        "first_window_s": first,
        "from_first_window_s": None if every is None else every - first,
    }


def kill_effect(r: dict) -> dict:
    """Survivors' window/round intervals before and after the kill, and their longest gap."""
    at = r.get("killed_at_s")
    out = {}
    for name, v in r["peers"].items():
        if at is None or name == f"peer{r['peers_n'] - 1}" or name == "joiner":
            continue
        ts = [t for t, _ in v.get("curve", [])]
        gaps = [(b, b - a) for a, b in itertools.pairwise(ts)]
        before = sorted(g for t, g in gaps if t <= at)
        after = sorted(g for t, g in gaps if t > at)
        out[name] = {
            "median_interval_before_s": before[len(before) // 2] if before else None,
            "median_interval_after_s": after[len(after) // 2] if after else None,
            "max_gap_after_s": max(after) if after else None,
            "windows": len(ts),
            "finished": v.get("top1") is not None,
        }
    return out


# ----- hivemind runs --------------------------------------------------------------------
def run_hivemind(a, task: Path, out: Path, *, n: int, kill: bool = False, late: bool = False):
    out.mkdir(parents=True, exist_ok=True)
    founders = n - 1 if late else n
    total = n
    steps = (a.late_rounds if late else a.kill_rounds if kill else a.rounds) * a.local_steps
    run_id = f"bench_{os.getpid()}_{out.name}"
    procs: dict[int, subprocess.Popen] = {}
    meter = SocketBytes().start()
    launch_at: dict[int, float] = {}
    t0 = time.time()

    def start(i: int, initial: str, is_late: bool) -> None:
        cmd = [
            sys.executable, __file__, "--hivemind-peer", "--index", str(i), "--out", str(out),
            "--task", str(task), "--initial-peers", initial, "--run-id", run_id,
            "--steps", str(5 * a.local_steps if is_late else steps),
            "--local-steps", str(a.local_steps), "--shards", str(a.shards),
            "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--seed", str(a.seed),
            "--target-batch-size", str(founders * a.local_steps * a.batch_size),
            "--matchmaking-time", str(a.matchmaking_time),
            "--averaging-timeout", str(a.averaging_timeout),
            "--linger-s", str(a.linger_s), "--n-total", str(total),
            "--barrier-s", str(a.start_timeout),
            *(["--blocking-averaging"] if a.blocking_averaging else []),
            "--target-group-size", str(a.target_group_size),
        ] + (["--late"] if is_late else []) + (["--founders-only"] if late else [])  # fmt: skip
        log = open(out / f"hm{i}.log", "w")  # noqa: SIM115 - child owns it
        launch_at[i] = time.time()
        procs[i] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        log.close()
        meter.track(procs[i].pid, f"peer{i}")

    def rows(i: int) -> list[dict]:
        p = out / f"hm{i}.jsonl"
        if not p.is_file():
            return []
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]

    def windows(i: int) -> int:
        return sum(r["event"] == "window" for r in rows(i))

    info: dict = {"system": "hivemind", "peers_n": n, "kill": kill, "late": late}
    try:
        start(0, "", False)
        if not _until(lambda: (out / "hm0.maddrs").is_file(), a.start_timeout):
            raise RuntimeError(f"hivemind peer 0 did not start: {(out / 'hm0.log').read_text()}")
        initial = (out / "hm0.maddrs").read_text().strip()
        for i in range(1, founders):
            start(i, initial, False)
        if late:
            _until(lambda: windows(0) >= 3, a.run_timeout)
            start(n - 1, initial, True)
        killed_at = None
        if kill:
            victim = n - 1
            if _until(lambda: windows(victim) >= 4, a.run_timeout):
                _kill_group(procs[victim])
                killed_at = time.time() - t0
        deadline = time.monotonic() + a.run_timeout
        for proc in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs.values():
            _kill_group(proc)
        net = meter.finish()
    peers = {}
    for i in procs:
        r = rows(i)
        log = (out / f"hm{i}.log").read_text(errors="replace")
        win = [x for x in r if x["event"] == "window"]
        done = next((x for x in r if x["event"] == "done"), None)
        joined = next((x for x in r if x["event"] == "joined"), None)
        peers[f"peer{i}"] = {
            "exit_code": procs[i].returncode,
            "windows": len(win),
            "curve": [(x["t"] - t0, x["loss"]) for x in win],
            "epochs": win[-1]["epoch"] if win else None,
            "averagings": log.count("Averaged parameters with"),
            "averaging_failed": log.count("Averaging failed") + log.count("Averaging step failed"),
            "state_downloads": log.count("Finished downloading state"),
            "finished_s": done["t"] - t0 if done else None,
            "top1": done["top1"] if done else None,
            "bytes": net.get(f"peer{i}"),
        }
        if joined:
            peers[f"peer{i}"]["join"] = {
                "launch_to_params_s": joined["t"] - launch_at[i],
                "load_s": joined["load_s"],
                "epoch": joined["epoch"],
                "params_changed": joined["changed"],
            }
    info.update(peers=peers, socket_samples=meter.samples, wall_s=time.time() - t0)
    if kill:
        info["killed_at_s"] = killed_at
    return info


# ----- our p2p runs ---------------------------------------------------------------------
LINE = re.compile(r"p2p peer (-?\d+): round (\d+) loss ([0-9.eE+-]+|nan)")


def _ours_cmd(a, run_dir: Path, *extra: str) -> list[str]:
    return [
        a.main_python, "train.py", "distributed=p2p", f"hydra.run.dir={run_dir}",
        "logger=none", "memory=none", f"seed={a.seed}",
        f"distributed.local_steps={a.local_steps}", f"distributed.shards={a.shards}",
        f"train.batch_size={a.batch_size}", f"train.lr={a.lr}", *extra,
    ]  # fmt: skip


class LogWatch:
    """Timestamps (since t0) of the ``round r loss`` lines of the peers' logs."""

    def __init__(self, folder: Path, t0: float) -> None:
        self.folder, self.t0 = folder, t0
        self.seen: dict[str, dict[int, tuple[float, float]]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def poll(self) -> None:
        now = time.time() - self.t0
        for p in sorted(self.folder.glob("peers/peer*.log")):
            try:
                text = p.read_text(errors="replace")
            except OSError:
                continue
            for m in LINE.finditer(text):
                peer = f"peer{m.group(1)}"
                rows = self.seen.setdefault(peer, {})
                rows.setdefault(int(m.group(2)), (now, float(m.group(3))))

    def rounds(self, peer: str) -> int:
        return len(self.seen.get(peer, {}))

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(0.2)

    def curves(self) -> dict[str, list[tuple[float, float]]]:
        self.stop.set()
        self.thread.join(timeout=5)
        self.poll()
        return {p: [v for _, v in sorted(r.items())] for p, r in self.seen.items()}


def _peer_pids(run_dir: Path) -> list[int]:
    pids = []
    for p in sorted((run_dir / "peers").glob("peer*.pid")):
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(p.read_text()))
    return pids


def run_ours(a, out: Path, *, n: int, kill: bool = False, late: bool = False) -> dict:
    run_dir = out / "group"
    out.mkdir(parents=True, exist_ok=True)
    founders = n - 1 if late else n
    rounds = a.late_rounds if late else (a.kill_rounds if kill else a.rounds)
    meter = SocketBytes().start()
    t0 = time.time()
    watch = LogWatch(run_dir, t0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    launcher_log = open(out / "launcher.log", "w")  # noqa: SIM115 - closed after Popen
    group = subprocess.Popen(
        _ours_cmd(a, run_dir, f"distributed.peers={founders}", f"distributed.rounds={rounds}"),
        cwd=REPO, stdout=launcher_log, stderr=subprocess.STDOUT,
        start_new_session=True, env=env,
    )  # fmt: skip
    launcher_log.close()
    procs = [group]
    tracked: set[int] = set()

    def track() -> None:
        for i, pid in enumerate(_peer_pids(run_dir)):
            if pid not in tracked:
                tracked.add(pid)
                meter.track(pid, f"peer{i}")

    info: dict = {"system": "sedma p2p", "peers_n": n, "kill": kill, "late": late}
    joiner_dir = out / "joiner"
    try:
        _until(lambda: len(_peer_pids(run_dir)) >= founders or group.poll() is not None, 120)
        track()
        if late:
            _until(lambda: watch.rounds("peer0") >= 3 or group.poll() is not None, a.run_timeout)
            boot = (run_dir / "p2p_bootstrap.txt").read_text().strip()
            key = (run_dir / "p2p_group_key").read_text().strip()
            join_launch = time.time()
            joiner_log = open(out / "joiner.log", "w")  # noqa: SIM115 - closed after Popen
            joiner = subprocess.Popen(
                _ours_cmd(
                    a, joiner_dir, f"distributed.bootstrap={boot}", "distributed.peers=1",
                    f"distributed.rounds={rounds}",
                ),
                cwd=REPO, stdout=joiner_log, stderr=subprocess.STDOUT,
                start_new_session=True, env={**env, "SEDMA_P2P_GROUP_KEY": key},
            )  # fmt: skip
            joiner_log.close()
            procs.append(joiner)
            addr = joiner_dir / "peers" / "peer-1.addr"
            _until(lambda: addr.is_file() or joiner.poll() is not None, 120, 0.05)
            addr_s = time.time() - join_launch if addr.is_file() else None
            for pid in _peer_pids(joiner_dir):
                meter.track(pid, "joiner")
        killed_at = None
        if kill:
            victim = f"peer{n - 1}"
            if _until(lambda: watch.rounds(victim) >= 4, a.run_timeout):
                pid = int((run_dir / "peers" / f"{victim}.pid").read_text())
                os.kill(pid, signal.SIGKILL)
                killed_at = time.time() - t0
        deadline = time.monotonic() + a.run_timeout
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            _kill_group(proc)
        for pid in _peer_pids(run_dir) + (_peer_pids(joiner_dir) if late else []):
            try:  # only if it is still one of our peers (not a reused pid)
                if b"p2p_train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError, PermissionError):
                pass
        net = meter.finish()
        curves = watch.curves()
    res_path = run_dir / "results.json"
    section = json.loads(res_path.read_text())["distributed"] if res_path.is_file() else {}
    reports = {f"peer{p['index']}": p for p in section.get("peers", [])}
    peers = {}
    for label in sorted(set(curves) | set(reports)):
        rep = reports.get(label, {})
        rnds = rep.get("rounds", [])
        peers[label] = {
            "exit_code": rep.get("exit_code"),
            "windows": len(curves.get(label, [])),
            "curve": curves.get(label, []),
            "finished_s": curves[label][-1][0] if label in curves and rep.get("top1") else None,
            "top1": rep.get("top1"),
            "bytes": net.get(label),
            "served_bytes": rep.get("stats", {}).get("served_bytes"),
            "averaged_with": [len(r["chosen"]) for r in rnds],
            "averagings": sum(bool(r["chosen"]) for r in rnds),
        }
    if late:
        jlog = joiner_dir / "peers" / "peer0.log"  # the launcher's log of its peer -1
        jrounds = [
            (int(m.group(2)), float(m.group(3)))
            for m in LINE.finditer(jlog.read_text(errors="replace") if jlog.is_file() else "")
        ]
        jpath = joiner_dir / "results.json"
        jrep = json.loads(jpath.read_text())["distributed"]["peers"][0] if jpath.is_file() else {}
        join = jrep.get("join", {})
        peers["joiner"] = {
            "exit_code": jrep.get("exit_code"),
            "top1": jrep.get("top1"),
            "bytes": net.get("joiner"),
            "served_bytes": jrep.get("stats", {}).get("served_bytes"),
            "join": {
                "launch_to_params_s": (addr_s + join["seconds"])
                if addr_s is not None and join.get("cid")
                else None,
                "load_s": join.get("seconds"),
                "round": join.get("round"),
                "params_changed": join.get("cid") is not None,
                "joined_at_round": jrep.get("joined_at_round"),
                "first_round_trained": jrounds[0][0] if jrounds else None,
                "first_round_loss": jrounds[0][1] if jrounds else None,
                "rounds_trained": len(jrounds),
            },
        }
    info.update(peers=peers, finished=section.get("finished"), lost=section.get("lost"))
    info["wall_s"] = time.time() - t0
    if kill:
        info["killed_at_s"] = killed_at
    return info


# ----- the table ------------------------------------------------------------------------
def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def summarize(results: dict, target: float) -> list[str]:
    lines = [
        f"target training loss (mean over an H-step window, every peer): {target:.2f}",
        f"{'run':<20}{'startup':>8}{'to target':>10}{'tgt-1st':>8}{'finish':>8}{'top1':>7}"
        f"{'MB sent':>9}{'payload':>9}{'avg ok':>12}{'join':>7}{'load':>7}",
    ]
    for name, r in results.items():
        if "/" not in name or not isinstance(r, dict) or "peers" not in r:
            continue
        peers = {k: v for k, v in r["peers"].items() if k != "joiner"}
        if r.get("kill"):  # time to target and finish: the survivors
            peers = {k: v for k, v in peers.items() if k != f"peer{r['peers_n'] - 1}"}
        curves = {k: v["curve"] for k, v in peers.items() if v.get("curve")}
        ttt = time_to_target(curves, target) if curves else {}
        r["time_to_target"] = ttt
        fins = [v["finished_s"] for v in peers.values() if v.get("finished_s") is not None]
        top = [v["top1"] for v in peers.values() if v.get("top1") is not None]
        sent = [v["bytes"]["sent"] for v in peers.values() if v.get("bytes")]
        pay = [v["served_bytes"] for v in peers.values() if v.get("served_bytes") is not None]
        avg = [v["averagings"] for v in peers.values() if v.get("averagings") is not None]
        join = next((v["join"] for v in r["peers"].values() if "join" in v), {})
        lines.append(
            f"{name:<20}{_fmt(ttt.get('first_window_s')):>8}{_fmt(ttt.get('all_peers_s')):>10}"
            f"{_fmt(ttt.get('from_first_window_s')):>8}"
            f"{_fmt(max(fins) if fins else None):>8}"
            f"{_fmt(sum(top) / len(top) if top else None, '.3f'):>7}"
            f"{_fmt(sum(sent) / len(sent) / 1e6 if sent else None, '.2f'):>9}"
            f"{_fmt(sum(pay) / len(pay) / 1e6 if pay else None, '.2f'):>9}"
            f"{'/'.join(str(x) for x in avg) if avg else '-':>12}"
            f"{_fmt(join.get('launch_to_params_s')):>7}{_fmt(join.get('load_s')):>7}"
        )
        if r.get("kill"):
            eff = kill_effect(r)
            r["kill_effect"] = eff
            for peer, e in eff.items():
                lines.append(
                    f"{'':<20}killed at {_fmt(r.get('killed_at_s'))} s; {peer}: finished "
                    f"{e['finished']}, interval {_fmt(e['median_interval_before_s'], '.2f')} -> "
                    f"{_fmt(e['median_interval_after_s'], '.2f')} s, longest gap after "
                    f"{_fmt(e['max_gap_after_s'], '.1f')} s"
                )
        if "error" in r:
            lines.append(f"{'':<20}error: {r['error']}")
    for name, r in results.items():
        if "/" in name and isinstance(r, dict) and "error" in r and "peers" not in r:
            lines.append(f"{name:<20}error: {r['error']}")
    return lines


def _main_python(given: str | None) -> str:
    cands = [given, os.environ.get("SEDMA_MAIN_PYTHON"), shutil.which("python3"), "python"]
    for c in cands:
        if not c:
            continue
        path = shutil.which(c) or c
        ok = subprocess.run(
            [path, "-c", "import sedma_torch, sys; print(sys.executable)"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
            env={k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"},
        )  # fmt: skip
        if ok.returncode == 0:
            return ok.stdout.strip().splitlines()[-1]
    raise SystemExit("no Python that imports sedma_torch found: pass --main-python")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--late-rounds", type=int, default=150)
    p.add_argument("--kill-rounds", type=int, default=60)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3.0e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=None)
    p.add_argument("--matchmaking-time", type=float, default=5.0)
    p.add_argument("--averaging-timeout", type=float, default=20.0)
    p.add_argument(
        "--blocking-averaging",
        action="store_true",
        help="hivemind delay_state_averaging=False: the step that ends an epoch waits for the "
        "averaging round (as ours waits for its round); default: hivemind's own default, "
        "averaging in the background",
    )
    p.add_argument(
        "--target-group-size",
        type=int,
        default=0,
        help="hivemind averager target_group_size (0: hivemind's default, None: matchmaking "
        "then lasts matchmaking_time); N ends matchmaking once N peers are in the group",
    )
    p.add_argument("--linger-s", type=float, default=20.0)
    p.add_argument("--start-timeout", type=float, default=120.0)
    p.add_argument("--run-timeout", type=float, default=400.0)
    p.add_argument("--only", default="base,kill,late", help="comma list of base, kill, late")
    p.add_argument("--systems", default="hivemind,ours")
    p.add_argument("--main-python", default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=str(REPO / "results" / "bench_hivemind.json"))
    # the hivemind peer subprocess
    p.add_argument("--hivemind-peer", action="store_true", help=argparse.SUPPRESS)
    for name in ("--index", "--steps", "--target-batch-size", "--n-total"):
        p.add_argument(name, type=int, default=0, help=argparse.SUPPRESS)
    for name in ("--out", "--task", "--initial-peers", "--run-id"):
        p.add_argument(name, default="", help=argparse.SUPPRESS)
    p.add_argument("--late", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--founders-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--barrier-s", type=float, default=120.0, help=argparse.SUPPRESS)
    p.add_argument("--resummarize", default=None, help="re-make the table of a results JSON")
    a = p.parse_args(argv)
    if a.resummarize:
        results = json.loads(Path(a.resummarize).read_text())
        lines = summarize(results, a.target or results["target_loss"])
        results["table"] = lines
        print("\n".join(lines))
        Path(a.resummarize).write_text(json.dumps(results, indent=1, default=str) + "\n")
        return 0
    if a.hivemind_peer:
        hivemind_peer(a)
        return 0
    try:
        import hivemind
    except ImportError as exc:
        print(f"hivemind not importable with {sys.executable}: {exc}", file=sys.stderr)
        return 2
    a.main_python = _main_python(a.main_python)
    work = Path(a.workdir or f"/tmp/bench_hivemind_{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    task = work / "task.pt"
    subprocess.run(
        [a.main_python, "-c", PREP, str(task), str(a.seed)], cwd=REPO, check=True, timeout=300
    )
    only = [x for x in a.only.split(",") if x]
    systems = [x for x in a.systems.split(",") if x]
    results: dict = {
        "settings": {k: v for k, v in vars(a).items() if not k.startswith(("index", "out"))},
        "hivemind_version": hivemind.__version__,
        "machine": _machine(),
        "links": "loopback 127.0.0.1, no rate limits",
        "hivemind_averaging": "blocking" if a.blocking_averaging else "background (default)",
        "hivemind_target_group_size": a.target_group_size or None,
    }
    n = a.peers
    for exp in only:
        for system in systems:
            name = f"{system}/{exp}"
            print(f"== {name}", flush=True)
            out = work / f"{system}_{exp}"
            kw = {"n": n, "kill": exp == "kill", "late": exp == "late"}
            try:
                if system == "hivemind":
                    results[name] = run_hivemind(a, task, out, **kw)
                else:
                    results[name] = run_ours(a, out, **kw)
            except Exception as exc:  # report and go on with the next run
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"{name} failed: {exc}", flush=True)
    target = a.target
    if target is None:
        base = results.get("ours/base", {}).get("peers", {})
        at = max(1, round(a.rounds * 2 / 3)) - 1
        vals = [v["curve"][at][1] for v in base.values() if len(v.get("curve", [])) > at]
        target = math.ceil(max(vals) * 20) / 20 if vals else 0.5
    results["target_loss"] = target
    lines = summarize(results, target)
    results["table"] = lines
    print("\n".join(lines))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {a.json}")
    return 0


def _machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "loadavg": os.getloadavg()}


if __name__ == "__main__":
    sys.exit(main())
