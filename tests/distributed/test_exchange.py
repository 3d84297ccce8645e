"""Multi-process tests of the memory-aware exchange (real gloo process groups).

Two runs of 3 processes each (module fixtures; a worker process costs seconds to start):
one exchange run (all peers healthy, then a straggler, then a killed rank) in the default
suite, and the DDP comparison with converted RRAM models (slow: it programs crossbars).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from sedma_torch.distributed import spawn

from .workers import (
    SmallMLP,
    ddp_fault_worker,
    ddp_worker,
    equality_worker,
    exchange_worker,
    mlp_batch,
    readmit_worker,
    step_tensor,
    store_listen_worker,
)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

WORLD = 3
SLOW = {"slow_rank": 2, "delay_s": 0.6, "steps": 6}
KILL = {"kill_rank": 2, "kill_step": 4, "steps": 9}
LATE = {"late_rank": 2, "late_step": 1, "delay_s": 1.5, "steps": 7}


def _load(directory, prefix, ranks):
    return {r: torch.load(directory / f"{prefix}_rank{r}.pt", weights_only=False) for r in ranks}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    codes = spawn(ddp_worker, WORLD, (str(out), 3), timeout_s=240)
    assert codes == [0] * WORLD
    return out


@pytest.fixture(scope="module")
def exchange_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exchange")
    start = time.monotonic()
    codes = spawn(exchange_worker, WORLD, (str(out), SLOW, LATE, KILL), timeout_s=240)
    return out, codes, time.monotonic() - start


def test_exchange_with_all_peers_equals_allreduce_average(exchange_run):
    directory, _, _ = exchange_run
    out = _load(directory, "peers", range(WORLD))
    for key in ("a", "b", "c"):
        reference = np.mean([o[key].numpy() for o in out.values()], axis=0)  # NumPy reference
        for r in range(WORLD):
            got = out[r][f"res_{key}"]
            np.testing.assert_allclose(got.numpy(), reference, rtol=1e-6)
            assert got.dtype == out[r][key].dtype
            assert torch.equal(got, out[0][f"res_{key}"])  # bit-identical on every rank
    for r in range(WORLD):
        graph = {i: sorted(peers) for i, peers in out[r]["graph"].items()}
        assert graph == {i: sorted(set(range(WORLD)) - {i}) for i in range(WORLD)}
        assert out[r]["broadcast_ok"]
        assert torch.equal(out[r]["res_d"], out[1]["d"])
        rtt = out[r]["rtt"]
        assert rtt[r] == 0.0 and all(0 < rtt[j] < 10_000 for j in range(WORLD) if j != r)


@pytest.mark.parametrize("world", [2, 4])
def test_k_all_equals_the_allreduce_average_with_2_and_4_processes(tmp_path, world):
    assert spawn(equality_worker, world, (str(tmp_path),), timeout_s=180) == [0] * world
    out = _load(tmp_path, "equality", range(world))
    for i in range(2):
        mean = np.mean([out[r]["inputs"][i].numpy() for r in range(world)], axis=0)  # NumPy
        for transport, key in (("collective", "collective=True"), ("p2p", "collective=False")):
            for r in range(world):
                assert out[r][key]["transport"] == transport
                got = out[r][key]["results"][i]
                assert got.dtype == out[r]["inputs"][i].dtype
                np.testing.assert_allclose(got.numpy(), mean, rtol=1e-6)
                torch.testing.assert_close(got, out[r]["allreduce"][i], rtol=1e-6, atol=1e-6)
                assert torch.equal(got, out[0][key]["results"][i])  # bit-identical on all ranks


@pytest.mark.slow
def test_rram_model_under_ddp_hook_matches_digital_ddp(ddp_run):
    out = _load(ddp_run, "ddp", range(WORLD))
    for name in out[0]["grad_digital"]:
        for r in range(WORLD):
            # ideal crossbars + memory-aware hook == digital model + DDP all-reduce
            torch.testing.assert_close(
                out[r]["grad_ideal"][name], out[r]["grad_digital"][name], rtol=1e-5, atol=1e-6
            )
        # non-ideal crossbars: the hooked gradient is the mean of the ranks' local gradients
        local = np.mean([o["grad_noisy_local"][name].numpy() for o in out.values()], axis=0)
        for r in range(WORLD):
            np.testing.assert_allclose(
                out[r]["grad_noisy"][name].numpy(), local, rtol=1e-5, atol=1e-6
            )
        for r in range(WORLD):  # default DDP (buffers broadcast every forward): same gradient
            torch.testing.assert_close(
                out[r]["grad_noisy_buffers"][name], out[r]["grad_noisy"][name]
            )
    for kind in ("digital", "ideal", "noisy", "noisy_buffers"):
        for name, p in out[0]["params"][kind].items():
            for r in range(1, WORLD):
                assert torch.equal(out[r]["params"][kind][name], p)  # replicas stay identical
    for name, p in out[0]["params"]["digital"].items():
        torch.testing.assert_close(out[0]["params"]["ideal"][name], p, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(out[0]["losses"]["noisy"]))


def test_straggler_misses_deadline_then_is_not_selected(exchange_run):
    directory, _, _ = exchange_run
    out = _load(directory, "straggler", range(WORLD))
    slow, fast = SLOW["slow_rank"], [0, 1]
    for r in fast:
        for row in out[r]["rows"]:
            step = row["step"]
            arrived = [r] if row["timed_out"] else [r, *row["sources"]]
            expected = np.mean([step_tensor(q, step).numpy() for q in arrived], axis=0)
            np.testing.assert_allclose(row["result"].numpy(), expected, rtol=1e-12)
            if step >= 3:  # after the refresh that measured the straggler's lateness
                assert row["sources"] == [1 - r]
                assert row["timed_out"] == 0
    # the straggler still averages with the fast peer it selected (their tensors came early)
    for row in out[slow]["rows"]:
        assert len(row["sources"]) == 1 and row["timed_out"] == 0
        peers = [slow, *row["sources"]]
        expected = np.mean([step_tensor(q, row["step"]).numpy() for q in peers], axis=0)
        np.testing.assert_allclose(row["result"].numpy(), expected, rtol=1e-12)


def test_member_late_for_a_collective_costs_at_most_two_deadlines_then_p2p(exchange_run):
    directory, _, _ = exchange_run
    out = _load(directory, "collective", range(WORLD))
    late, step_late, fast = LATE["late_rank"], LATE["late_step"], [0, 1]
    everyone = list(range(WORLD))
    for r in range(WORLD):
        rows = out[r]["rows"]
        assert out[r]["collective_failures"] == 1
        for step, row in enumerate(rows):
            expected = np.mean([step_tensor(q, step).numpy() for q in row["participants"]], axis=0)
            np.testing.assert_allclose(row["result"].numpy(), expected, rtol=1e-12)
            if step != step_late:
                assert row["participants"] == everyone, (r, step)
        # all-reduce before the failure, point-to-point for the rest of that epoch, then a
        # new subgroup (next generation) from the next refresh (step 4) on
        assert [row["transport"] for row in rows] == ["collective"] + ["p2p"] * 3 + [
            "collective"
        ] * 3
        assert out[r]["generations"] == [1]
    for r in fast:  # the fast ranks waited <= 2 deadlines (0.5 s each) and went on without it
        row = out[r]["rows"][step_late]
        assert row["participants"] == fast
        assert row["elapsed_s"] < 2 * 0.5 + 0.4
    # the late rank's collective failed at once; its redo received the others' tensors
    assert out[late]["rows"][step_late]["participants"] == everyone


def test_killed_peer_is_dropped_and_run_ends_cleanly(exchange_run):
    directory, codes, elapsed = exchange_run
    kill_rank, kill_step = KILL["kill_rank"], KILL["kill_step"]
    survivors = [r for r in range(WORLD) if r != kill_rank]
    assert codes[kill_rank] == -9  # SIGKILL, not a Python exit
    assert [codes[r] for r in survivors] == [0] * len(survivors)
    assert elapsed < 240
    out = _load(directory, "fault", survivors)
    for r in survivors:
        assert out[r]["dead"] == [kill_rank]
        assert out[r]["finished"] == survivors
        assert len(out[r]["results"]) == KILL["steps"]
        for step, got in enumerate(out[r]["results"]):
            ranks = list(range(WORLD)) if step < kill_step else survivors
            assert out[r]["participants"][step] == ranks, f"step {step}"
            expected = np.mean([step_tensor(q, step).numpy() for q in ranks], axis=0)
            np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, err_msg=f"step {step}")


@pytest.mark.slow
def test_ddp_with_hook_survives_a_killed_rank_and_averages_the_survivors(tmp_path):
    kill_rank, kill_step, steps = 2, 3, 6
    codes = spawn(ddp_fault_worker, WORLD, (str(tmp_path), kill_rank, kill_step, steps))
    survivors = [r for r in range(WORLD) if r != kill_rank]
    assert codes[kill_rank] == -9
    assert [codes[r] for r in survivors] == [0] * len(survivors)
    out = _load(tmp_path, "ddpfault", survivors)
    # single-process reference: SGD on the mean of the participating ranks' gradients
    torch.manual_seed(0)
    reference = SmallMLP()
    for step in range(steps):
        ranks = list(range(WORLD)) if step < kill_step else survivors
        grads = []
        for r in ranks:
            reference.zero_grad()
            x, y = mlp_batch(r, step)
            torch.nn.functional.cross_entropy(reference(x), y).backward()
            grads.append([p.grad.numpy().copy() for p in reference.parameters()])
        with torch.no_grad():
            for i, p in enumerate(reference.parameters()):
                p -= 0.5 * torch.from_numpy(np.mean([g[i] for g in grads], axis=0))
    for r in survivors:
        assert out[r]["dead"] == [kill_rank]
        assert out[r]["participants"][kill_step:] == [survivors] * (steps - kill_step)
        for name, p in reference.named_parameters():
            torch.testing.assert_close(out[r]["params"][name], p.detach(), rtol=1e-5, atol=1e-6)


READMIT = {
    "slow_rank": 2,
    "slow_steps": list(range(2, 6)),
    "delay_s": 0.6,
    "compute_s": 0.15,
    "steps": 20,
    "lr": 0.5,
}


@pytest.mark.parametrize("mode", ["ddp", pytest.param("group", marks=pytest.mark.slow)])
def test_slowed_rank_is_left_out_then_readmitted_and_resynchronised(tmp_path, mode):
    args = (str(tmp_path), *READMIT.values(), mode)
    codes = spawn(readmit_worker, WORLD, args, timeout_s=240)
    assert codes == [0] * WORLD
    out = _load(tmp_path, "readmit", range(WORLD))
    slow, steps, every = READMIT["slow_rank"], READMIT["steps"], 2
    views = out[0]["views"]
    assert all(out[r]["views"] == views for r in range(WORLD))  # one sequence of views
    out_epochs = [e for e, v in enumerate(views) if slow not in v]
    assert out_epochs, f"the slowed rank was never left out: {views}"
    back = [e for e in range(out_epochs[0], len(views)) if slow in views[e]]
    assert back, f"the slowed rank was never re-admitted: {views}"
    assert out[slow]["stats"]["readmitted"] >= 1 and out[slow]["stats"]["resyncs"] >= 1
    assert out[slow]["stats"]["resync_failures"] == 0
    assert out[slow]["resync_step"] == back[0] * every
    assert views[-1] == [0, 1, 2]
    for r in range(WORLD):  # after the re-sync the replicas are equal again, bit for bit
        for name, p in out[0]["params"].items():
            assert torch.equal(out[r]["params"][name], p), (r, name)
    # independent replay in this process: every rank's replica updated with the mean of the
    # gradients of the ranks it averaged with, the re-admitted rank's replica replaced by
    # the source's (lowest continuing member) before that step's update
    torch.manual_seed(0)
    init = SmallMLP()
    replicas = {r: [p.detach().clone() for p in init.parameters()] for r in range(WORLD)}
    names = [n for n, _ in init.named_parameters()]
    resyncs = {}
    for e in back[:1]:
        source = min(set(views[e]) & set(views[e - 1]))
        resyncs[e * every] = source
    for step in range(steps):
        grads = {}
        for r in range(WORLD):
            with torch.no_grad():
                for p, v in zip(init.parameters(), replicas[r], strict=True):
                    p.copy_(v)
            init.zero_grad()
            x, y = mlp_batch(r, step)
            torch.nn.functional.cross_entropy(init(x), y).backward()
            grads[r] = [p.grad.detach().clone() for p in init.parameters()]
        if step in resyncs:
            replicas[slow] = [v.clone() for v in replicas[resyncs[step]]]
        for r in range(WORLD):
            ranks = out[r]["participants"][step]
            assert r in ranks
            for i, v in enumerate(replicas[r]):
                mean = np.mean([grads[q][i].numpy() for q in ranks], axis=0)
                v -= READMIT["lr"] * torch.from_numpy(mean)
    for r in range(WORLD):
        for i, name in enumerate(names):
            torch.testing.assert_close(out[r]["params"][name], replicas[r][i], rtol=1e-5, atol=1e-6)
    # while left out, the slowed rank trained alone and the others without it
    for e in out_epochs:
        for step in range(e * every, min((e + 1) * every, steps)):
            assert out[slow]["participants"][step] == [slow]
            assert out[0]["participants"][step] == [0, 1]
    assert all(t == "collective" for t in out[0]["transports"][back[0] * every :])


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_spawn_rendezvous_store_listens_on_loopback_only(tmp_path):
    # the launcher's TCPStore has no authentication: it must not accept connections from
    # other machines (TCPStore alone binds its server to every interface)
    out = tmp_path / "listen.txt"
    codes = spawn(store_listen_worker, 2, (str(out),), timeout_s=120)
    assert codes == [0, 0]
    addresses = out.read_text().split()
    assert addresses, "the launcher listens on no TCP socket"
    assert all(a.startswith("127.0.0.1:") for a in addresses), addresses
