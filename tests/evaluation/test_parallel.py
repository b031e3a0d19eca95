"""mathpt.evaluation.parallel: jobs in spawned processes that never outlive the process that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_PARENT = r"""
import os, subprocess, sys, time
from pathlib import Path
from mathpt.evaluation.parallel import run_on_devices


def job(device, out):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # like vLLM's engine core
    Path(out).write_text(f"{os.getpid()} {child.pid}")
    time.sleep(120)


if __name__ == "__main__":
    run_on_devices(job, [("cpu", {"out": sys.argv[1]})], what="shard")
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0): read its state
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_shard_and_its_children_die_with_a_killed_parent(tmp_path):
    script, pids = tmp_path / "parent.py", tmp_path / "pids"
    script.write_text(_PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script), str(pids)], env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    try:
        deadline = time.monotonic() + 60
        while not (pids.exists() and pids.read_text()):
            assert time.monotonic() < deadline and parent.poll() is None, "the shard never started"
            time.sleep(0.1)
        shard, grandchild = map(int, pids.read_text().split())
        assert _alive(shard) and _alive(grandchild)
        parent.send_signal(signal.SIGKILL)  # no clean-up runs in the parent
        parent.wait()
        t0 = time.monotonic()
        while (_alive(shard) or _alive(grandchild)) and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        assert not _alive(shard) and not _alive(grandchild), "a shard outlived its killed parent"
        assert time.monotonic() - t0 < 3
    finally:
        parent.kill()


def _fails(device):
    raise ValueError("row 3 is bad")


def _ok(device, x):
    return (device, x * 2)


def test_results_in_order_and_a_failure_names_the_job():
    from mathpt.evaluation.parallel import run_on_devices
    from mathpt.io import MathptError

    assert run_on_devices(_ok, [("cpu", {"x": 1}), ("cpu", {"x": 2})]) == [("cpu", 2), ("cpu", 4)]
    with pytest.raises(MathptError, match=r"shard 0 on cpu failed: ValueError: row 3 is bad"):
        run_on_devices(_fails, [("cpu", {})], what="shard")
