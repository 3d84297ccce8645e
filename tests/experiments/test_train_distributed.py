"""train.py with the ``distributed`` group: 2 spawned gloo ranks, DDP + memory-aware hook."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from sedma_torch.experiments.distributed_train import exchange_config

from ..conftest import REPO
from .helpers import app_env, run_app

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]


def _group_override() -> str:
    """``distributed=memory_aware`` once configs/config.yaml lists the group in its
    defaults, ``+distributed=memory_aware`` until then."""
    defaults = OmegaConf.load(REPO / "configs" / "config.yaml").defaults
    listed = any(not isinstance(d, str) and "distributed" in d for d in defaults)
    return "distributed=memory_aware" if listed else "+distributed=memory_aware"


TINY = [
    "distributed.refresh_every=3",
    "logger=none",
    "train.progress=false",
    "train.epochs=1",
    "train.hwa_epochs=1",
    "dataset.limit_train=130",
    "train.batch_size=32",
    "train.compare_materials=[]",
    "train.compare_corrections=[none]",
]


def _check_run(run_dir, *, spawned: bool = True) -> None:
    payload = json.loads((run_dir / "results.json").read_text())
    assert payload["distributed"]["world_size"] == 2
    section = payload["distributed"]
    # nobody lost: both phases over both ranks (the hwa phase reuses the world group)
    assert section["members"] == [0, 1] and section["lost_ranks"] == []
    assert [(p["phase"], p["members"]) for p in section["phases"]] == [
        ("digital", [0, 1]),
        ("hwa", [0, 1]),
    ]
    if spawned:  # the launcher's record of how every rank ended
        assert section["failed_ranks"] == []
        assert [(r["rank"], r["status"], r["exit_code"]) for r in section["ranks"]] == [
            (0, "ok", 0),
            (1, "ok", 0),
        ]
    assert [r["label"] for r in payload["rows"]] == ["digital", "hwa:digital", "hwa:taox_hfox/none"]
    replicas = {r: torch.load(run_dir / "replicas" / f"rank{r}.pt") for r in (0, 1)}
    for r, rep in replicas.items():
        assert rep["rank"] == r and rep["world_size"] == 2
        # 65 samples per rank, batches of 32: 3 steps per phase, all by the all-reduce path
        for phase in rep["exchange"]:
            assert phase["exchanges"] == 3 and phase["collective_exchanges"] == 3
            assert phase["timeouts"] == 0 and phase["dead"] == []
    # the ranks trained on disjoint shards; only the averaged gradients keep them equal
    for kind in ("digital", "hwa"):
        for name, value in replicas[0]["models"][kind].items():
            assert torch.equal(replicas[1]["models"][kind][name], value), (kind, name)
    saved = torch.load(run_dir / "model_digital.pt")
    for name, value in saved.items():
        assert torch.equal(replicas[1]["models"]["digital"][name], value)


def test_distributed_group_rejects_unknown_keys_and_bad_values():
    assert exchange_config({"enabled": True, "k": 1, "deadline_s": 2.0}).k == 1
    with pytest.raises(ValueError, match="bogus"):
        exchange_config({"enabled": True, "bogus": 1})
    with pytest.raises(ValueError, match="deadline_s"):
        exchange_config({"deadline_s": 0})
    # the launcher's and the phase boundary's bounds
    assert exchange_config({"exit_grace_s": 0, "unresponsive_s": 2.5, "phase_join_s": 1}).k is None
    for key, bad in [("exit_grace_s", -1), ("unresponsive_s", 0), ("phase_join_s", "soon")]:
        with pytest.raises(ValueError, match=key):
            exchange_config({key: bad})


def test_two_rank_run_trains_identical_replicas_and_writes_results(tmp_path):
    args = [_group_override(), "distributed.world_size=2", *TINY, f"hydra.run.dir={tmp_path}"]
    proc = run_app("train.py", args, timeout=360)
    _check_run(tmp_path)
    assert "distributed: started 2 rank(s): rank 0 pid" in proc.stdout
    assert "unresponsive" not in proc.stdout and "lost rank" not in proc.stderr
    # no library noise (issue 15 item 12): DDP's broadcast_buffers FutureWarning, the
    # resource tracker's leaked-semaphore warning of the spawned ranks
    assert "broadcast_buffers" not in proc.stderr, proc.stderr[-2000:]
    assert "leaked semaphore" not in proc.stderr, proc.stderr[-2000:]
    # rank 0 prints the table in a spawned process: it reaches the job's log too
    assert "hwa:taox_hfox/none" in (tmp_path / "train.log").read_text()


@pytest.mark.slow
def test_under_torchrun_the_ranks_join_its_group(tmp_path):
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"),
        str(REPO / "train.py"),
        _group_override(),
        *TINY,
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=app_env(), capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stderr[-5000:]
    _check_run(tmp_path, spawned=False)
