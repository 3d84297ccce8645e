"""Checkpoints: atomic replace, weights-only loading, clear errors."""

from __future__ import annotations

import pytest
import torch

from sedma_torch.experiments.checkpoint import load_checkpoint, save_checkpoint


def test_round_trip_with_weights_only(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {"epoch": 3, "model": {"w": torch.randn(4, 5, generator=gen)}, "hist": [{"a": 1.5}]}
    path = save_checkpoint(tmp_path / "ck" / "last.pt", state)
    back = load_checkpoint(path)
    assert back["epoch"] == 3 and back["hist"] == [{"a": 1.5}]
    assert torch.equal(back["model"]["w"], state["model"]["w"])


def test_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    with pytest.raises(Exception):  # noqa: B017 - torch.save cannot pickle a lambda
        save_checkpoint(path, {"epoch": 2, "bad": lambda: None})
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class Arbitrary:
    """Any class: unpickling it would run code from this module."""


def test_pickled_code_is_refused_by_weights_only_loading(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Arbitrary()}, path)
    with pytest.raises(ValueError, match=r"weights-only"):
        load_checkpoint(path)


def test_missing_and_non_dict_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a dict"):
        load_checkpoint(tmp_path / "list.pt")


@pytest.mark.faults
def test_temporary_of_a_killed_write_is_removed_by_the_next_write(tmp_path):
    # a writer killed (SIGKILL) inside torch.save leaves its temporary file; the next
    # save removes it, and leaves the temporary of a write still running alone
    import os
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, torch\n"
            "from sedma_torch.experiments.checkpoint import save_checkpoint\n"
            "torch.save = lambda *a, **k: (print('writing', flush=True), time.sleep(600))\n"
            f"save_checkpoint({str(path)!r}, {{'epoch': 2}})\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "writing"
        (left,) = [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
        assert f".{child.pid}." in left.name
        live = tmp_path / f".last.pt.{os.getppid()}.abcd1234.tmp"  # a live writer's
        live.write_bytes(b"in progress")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    time.sleep(0.1)
    assert left.exists()  # a kill leaves it ...
    save_checkpoint(path, {"epoch": 3})
    assert not left.exists()  # ... and the next write removes it
    assert live.exists()
    assert load_checkpoint(path)["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.pt", live.name])
