"""The README's Tour is examples/tour.py, and it runs as pasted (issue 15 item 3)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .conftest import REPO


def _tour_block() -> str:
    readme = (REPO / "README.md").read_text()
    tour = readme[readme.index("\n## Tour\n") :]
    tour = tour[: tour.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", tour, flags=re.S)
    assert len(blocks) == 1, "the Tour has one Python block"
    return blocks[0]


def test_readme_tour_is_examples_tour_py():
    assert _tour_block() == (REPO / "examples" / "tour.py").read_text()


def test_readme_tour_runs_as_pasted(tmp_path):
    # the README's text itself (not the file), as a user pastes it into a script
    script = tmp_path / "pasted_tour.py"
    script.write_text(_tour_block())
    # this checkout's code, whatever is installed (TMPDIR stays: a fresh one would rebuild
    # torch.compile's cache, about 18 s; the tour removes its own temporary folder)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "torch.Size([4, 256]) torch.Size([2, 16, 32, 32])" in out
    assert "RRAM layers" in out and "mvm rel. L2 error" in out
    assert re.search(r"^\d+ Kubernetes manifests validated$", out, flags=re.M)
