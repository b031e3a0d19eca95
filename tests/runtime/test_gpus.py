"""GPU claims on CPU, with fake device lists: MATHPT_NUM_GPUS stands in for nvidia-smi, and
CUDA_VISIBLE_DEVICES for what SLURM (--gpus), a container or the user hands a job."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from mathpt.gpus import claim_gpus, visible_gpus
from mathpt.io import MathptError


@pytest.fixture
def gpus(monkeypatch, tmp_path):
    """Fake a machine with ``n`` GPUs and, optionally, a scheduler's CUDA_VISIBLE_DEVICES."""

    def make(n: int, visible: str | None = None, slurm_job: str | None = None) -> None:
        monkeypatch.setenv("MATHPT_NUM_GPUS", str(n))
        monkeypatch.setenv("MATHPT_GPU_LOCK_DIR", str(tmp_path / "locks"))
        for var, value in (("CUDA_VISIBLE_DEVICES", visible), ("SLURM_JOB_ID", slurm_job)):
            if value is None:
                monkeypatch.delenv(var, raising=False)
            else:
                monkeypatch.setenv(var, value)

    return make


def test_without_cuda_visible_devices_every_gpu_is_a_candidate(gpus):
    gpus(3)
    assert visible_gpus() == ["0", "1", "2"]
    with claim_gpus(2) as got:
        assert got == ["0", "1"] and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


@pytest.mark.parametrize("seed", range(5))
def test_claims_stay_within_cuda_visible_devices(gpus, seed):
    """Random subsets of an 8-GPU node: every claim lies in the given set, none twice."""
    rng = random.Random(seed)
    given = rng.sample([str(i) for i in range(8)], rng.randint(1, 8))
    gpus(8, ",".join(given))
    assert visible_gpus() == given
    n = rng.randint(1, len(given))
    with claim_gpus(n) as got:
        assert len(got) == n == len(set(got)) and set(got) <= set(given)
        assert os.environ["CUDA_VISIBLE_DEVICES"].split(",") == got
    with pytest.raises(MathptError, match=rf"needs {len(given) + 1} GPU\(s\).*leaves {len(given)}"):
        with claim_gpus(len(given) + 1):
            pass


def test_concurrent_claims_do_not_share_and_never_leave_the_set(gpus, monkeypatch):
    gpus(4, "2,3")
    with claim_gpus(1) as a:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # the next job's process sees the scheduler's set
        with claim_gpus(1) as b:
            assert sorted(a + b) == ["2", "3"]
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
            with pytest.raises(MathptError, match="could not claim 1 free GPU"):
                with claim_gpus(1, timeout_s=0):
                    pass


def test_claim_restores_cuda_visible_devices(gpus):
    gpus(4, "1,3")
    with claim_gpus(1):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,3"
    gpus(2)
    with claim_gpus(2):
        pass
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_uuid_entries_and_cuda_truncation_rules(gpus):
    gpus(2, "GPU-aaaa,MIG-bbbb")
    assert visible_gpus() == ["GPU-aaaa", "MIG-bbbb"]
    gpus(4, "1,7,2")  # CUDA stops at the first id that names no GPU
    assert visible_gpus() == ["1"]
    gpus(4, "-1,0")
    assert visible_gpus() == []


@pytest.mark.parametrize("visible", ["", "-1", "NoDevFiles"])
def test_gpu_job_without_visible_gpus_fails_at_once_with_the_reason(gpus, visible):
    gpus(4, visible)
    with pytest.raises(
        MathptError, match=rf"needs 1 GPU\(s\).*CUDA_VISIBLE_DEVICES='{visible}'.*GPU partition"
    ):
        with claim_gpus(1, timeout_s=600):  # no wait: nothing to wait for
            pass


def test_gpu_job_on_a_machine_without_gpus_fails(gpus):
    gpus(0)
    with pytest.raises(MathptError, match=r"needs 2 GPU\(s\) .*nvidia-smi -L lists 0"):
        with claim_gpus(2):
            pass
    with claim_gpus(0) as got:  # CPU jobs are unaffected
        assert got == []


def test_slurm_jobs_lock_in_their_own_namespace(gpus, tmp_path):
    """Two SLURM jobs on one node may both see their GPU as id 0 (device cgroups renumber): the
    second must not wait for the first's lock."""
    gpus(1, "0", slurm_job="101")
    with claim_gpus(1) as a:
        os.environ["SLURM_JOB_ID"] = "102"
        with claim_gpus(1, timeout_s=0) as b:
            assert a == b == ["0"]
    assert {p.name for p in (tmp_path / "locks").iterdir()} == {"slurm-101", "slurm-102"}


def test_gpu_rule_without_gpus_ends_the_script_with_the_rule_name(gpus, tmp_path):
    """Through run_script, as a Snakemake job runs it: exit 1 and one clear line, no traceback."""
    gpus(0, "")
    code = f"""
import types
from mathpt.pipeline import run_script
smk = types.SimpleNamespace(log=[{str(tmp_path / "job.log")!r}], params=types.SimpleNamespace(cfg='{{}}'),
                            resources=types.SimpleNamespace(gpu=1), rule='train')
run_script(smk, lambda smk, cfg: print('should not run'))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ}
    )
    assert proc.returncode == 1
    assert "mathpt error in rule train: this job needs 1 GPU(s)" in proc.stderr
    assert "Traceback" not in proc.stderr and "should not run" not in (tmp_path / "job.log").read_text()
