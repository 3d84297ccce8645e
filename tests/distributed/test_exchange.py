"""Multi-process tests of the memory-aware exchange (real gloo process groups).

Two runs of 3 processes each (module fixtures; a worker process costs seconds to start):
one exchange run (all peers healthy, then a straggler, then a killed rank) in the default
suite, and the DDP comparison with converted RRAM models (slow: it programs crossbars).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from sedma_torch.distributed import spawn

from .workers import (
    SmallMLP,
    ddp_fault_worker,
    ddp_worker,
    exchange_worker,
    mlp_batch,
    step_tensor,
)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

WORLD = 3
SLOW = {"slow_rank": 2, "delay_s": 0.6, "steps": 6}
KILL = {"kill_rank": 2, "kill_step": 4, "steps": 9}


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
    codes = spawn(exchange_worker, WORLD, (str(out), SLOW, KILL), timeout_s=240)
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
