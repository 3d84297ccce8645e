"""Issue 16 item 7: an empty (0-byte) file is refused untouched instead of silently turned
into a store; a store that cannot be written (read-only file, folder or file system) is
refused naming the path and the permission problem, not blamed on the file format.

The permission tests run the store in a child process. As root, file modes do not stop
writes (``CAP_DAC_OVERRIDE``), so the child drops that capability (and
``CAP_DAC_READ_SEARCH``) from its bounding set before ``exec``: the kernel then applies the
modes to it as to any user. Each test first checks, in the same child, that the kernel really
refuses a plain write (so a passing test cannot come from a setup that did not take). The
read-only file system is a real read-only bind mount in a private mount namespace
(``unshare``).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sedma_torch.memory import LongTermMemory, MemoryStoreError

FORK = mp.get_context("fork")

CHILD = """
import json, os, sys
from pathlib import Path
from sedma_torch.memory import LongTermMemory, MemoryStoreError
store, probe = Path(sys.argv[1]), Path(sys.argv[2])
try:  # reference: does the kernel refuse a plain write of `probe` (a file, or a new file)?
    with open(probe if probe.is_file() else probe / "probe.tmp", "ab"):
        pass
    (probe / "probe.tmp").unlink(missing_ok=True)
    refused = None
except OSError as exc:
    refused = exc.strerror
try:
    with LongTermMemory(store) as ltm:
        ltm.put("k", "new", {"x": 2})
    result = {"opened": True}
except MemoryStoreError as exc:
    result = {"opened": False, "error": str(exc)}
print(json.dumps({"probe_refused": refused, **result}))
"""

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _drop_file_capabilities() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _open_in_child(store: Path, probe: Path, prefix: list[str] | None = None) -> dict:
    """Open ``store`` (and write a record) in a child process that file modes apply to;
    ``probe`` is what the child first tries to write directly, as a reference."""
    root = os.geteuid() == 0
    try:
        proc = subprocess.run(
            [*(prefix or []), sys.executable, "-c", CHILD, str(store), str(probe)],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            preexec_fn=_drop_file_capabilities if root else None,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        if root:
            pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE ({exc})")
        raise
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["probe_refused"] is None:
        pytest.skip(
            f"the kernel lets this process write {probe} anyway (e.g. root without "
            "capability control): file modes cannot be tested here"
        )
    return result


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_store(path: Path) -> str:
    with LongTermMemory(path) as ltm:
        ltm.put("k", "old", {"x": 1})
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # WAL folded in
    return _sha256(path)


# ----------------------------------------------------------------------------- empty files


def test_an_empty_file_is_refused_and_left_as_it_is(tmp_path):
    path = tmp_path / "memory.db"
    path.write_bytes(b"")
    mtime = path.stat().st_mtime_ns
    with pytest.raises(MemoryStoreError) as info:
        LongTermMemory(path)
    message = str(info.value)
    assert str(path) in message and "empty file (0 bytes)" in message
    assert "Delete it" in message and "another path" in message
    assert path.read_bytes() == b"" and path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.db"]  # no -wal, -shm, temp
    path.unlink()  # what the message says to do: then a store is created there
    with LongTermMemory(path) as ltm:
        ltm.put("k", "a", {"x": 1})
    with LongTermMemory(path) as ltm:
        assert ltm.get("k", "a") == {"x": 1}


def test_a_new_path_creates_a_store_leaving_no_temporary_file(tmp_path):
    path = tmp_path / "new" / "memory.db"
    with LongTermMemory(path) as ltm:
        assert ltm.schema_version == 2
        ltm.put("k", "a", {"x": 1})
    assert sorted(p.name for p in path.parent.iterdir()) == ["memory.db"]
    assert path.read_bytes()[:16] == b"SQLite format 3\x00"
    with LongTermMemory(path) as ltm:
        assert ltm.get("k", "a") == {"x": 1}


def _create_together(path: str, rank: int, barrier) -> None:
    barrier.wait(timeout=60)
    with LongTermMemory(path, busy_timeout_s=60) as ltm:
        ltm.record_cache_access("created", rank)


@pytest.mark.slow  # 4 processes x 6 rounds; a -wal removed mid-check once read as unwritable
def test_processes_creating_one_store_at_once_never_see_it_empty(tmp_path):
    """Refusing 0-byte files must not break opening a fresh store together: the store is
    linked into place complete, so no process finds an empty file at the path."""
    ranks = 4
    for round_ in range(6):
        path = tmp_path / f"memory{round_}.db"
        barrier = FORK.Barrier(ranks)
        procs = [
            FORK.Process(target=_create_together, args=(str(path), r, barrier))
            for r in range(ranks)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0] * ranks, f"round {round_}"
        with LongTermMemory(path) as ltm:
            assert ltm.cache_stats("created")["accesses"] == ranks
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"memory{r}.db" for r in range(6)]


# ----------------------------------------------------------------------------- permissions


def test_a_read_only_store_file_is_refused_naming_it_not_writable(tmp_path):
    path = tmp_path / "memory.db"
    before = _make_store(path)
    path.chmod(0o444)
    try:
        result = _open_in_child(path, probe=path)
    finally:
        path.chmod(0o644)
    assert not result["opened"], "a store that cannot be written was opened"
    assert result["error"].startswith(f"SQLite file {path}: is not writable (permission denied)")
    assert "SQLite database" not in result["error"]  # not blamed on the format
    assert _sha256(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.db"]  # no -wal / -shm


def test_a_store_in_a_read_only_folder_is_refused_naming_the_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "memory.db"
    before = _make_store(path)
    folder.chmod(0o555)
    try:
        result = _open_in_child(path, probe=folder)
    finally:
        folder.chmod(0o755)
    assert not result["opened"]
    error = result["error"]
    assert f"SQLite file {path}: its folder {folder} is not writable (permission denied)" in error
    assert "memory.db-wal" in error
    assert "cannot be read as an SQLite database" not in error  # the old, wrong diagnosis
    assert _sha256(path) == before
    assert sorted(p.name for p in folder.iterdir()) == ["memory.db"]


def test_a_new_store_in_a_read_only_folder_is_refused_naming_the_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = _open_in_child(folder / "memory.db", probe=folder)
    finally:
        folder.chmod(0o755)
    assert not result["opened"]
    assert f"its folder {folder} is not writable (permission denied)" in result["error"]
    assert list(folder.iterdir()) == []


def test_a_store_on_a_read_only_file_system_is_refused_naming_it(tmp_path):
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed: no way to mount read-only")
    folder = tmp_path / "mnt"
    folder.mkdir()
    path = folder / "memory.db"
    before = _make_store(path)
    # a private mount namespace: the read-only bind mount is seen by the child only
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    mount = (
        f"mount --bind '{folder}' '{folder}' && mount -o remount,bind,ro '{folder}' && "
        f'exec "$0" "$@"'
    )
    check = subprocess.run(
        [unshare, *user, "--mount", "sh", "-c", mount, "true"], capture_output=True, text=True
    )
    if check.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {check.stderr.strip()}")
    result = _open_in_child(path, probe=path, prefix=[unshare, *user, "--mount", "sh", "-c", mount])
    assert not result["opened"]
    assert result["probe_refused"] == "Read-only file system"
    error = result["error"]
    assert f"SQLite file {path}: its folder {folder} is not writable" in error
    assert "read-only file system" in error
    assert "cannot be read as an SQLite database" not in error
    assert _sha256(path) == before
    assert sorted(p.name for p in folder.iterdir()) == ["memory.db"]


def test_companion_removed_during_the_writability_check_is_not_unwritable(tmp_path):
    """Another process's connection may delete ``-wal`` between ``exists()`` and
    ``access()``; a file that is gone is not a permission problem (SQLite recreates it)."""
    from sedma_torch.memory.long_term import _unwritable

    gone = tmp_path / "memory.db-wal"
    assert _unwritable(gone) is None
    ro = tmp_path / "ro"
    ro.write_bytes(b"x")
    ro.chmod(0o444)
    if os.geteuid() != 0:  # root writes read-only files; the kernel check says so
        assert _unwritable(ro) == "permission denied"
