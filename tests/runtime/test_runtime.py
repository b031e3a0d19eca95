"""The dual-process runtime: hand-off layouts (fast), then real worker processes (slow).

The vLLM tests share one worker (one ~20 s engine start) through a module-scoped fixture; the
fault and hand-off-mode tests use the ``hf`` engine, which starts in seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from mathpt.engines import SamplingConfig
from mathpt.engines.hf_engine import HFEngine
from mathpt.io import MathptError
from mathpt.models import load_model, load_tokenizer
from mathpt.runtime import InferenceClient, RolloutPipeline, WorkerError
from mathpt.runtime.handoff import Layout, named_weights, resolve_mode
from mathpt.runtime.worker import JobResult, _next_job

GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0)
PROMPTS = ["Natalia sold clips to 48 of her friends", "How many apples", "The answer is", "x"]

# ---------------------------------------------------------------- fast unit tests


def test_layout_pack_roundtrip_and_cast():
    g = torch.Generator().manual_seed(0)
    named = [
        ("a.weight", torch.randn(3, 4, generator=g)),
        ("b", torch.randn(5, generator=g)),
        ("c.bias", torch.randn(2, 1, 2, generator=g)),
    ]
    for dtype in (torch.float32, torch.bfloat16):
        lay = Layout.of(named, dtype)
        assert (
            lay.numel == 12 + 5 + 4 and lay.nbytes == lay.numel * torch.empty((), dtype=dtype).element_size()
        )
        flat = torch.full((lay.numel,), float("nan"), dtype=dtype)
        lay.pack(named, flat)
        assert not torch.isnan(flat).any()  # every slot written
        for (n, t), (vn, v) in zip(named, lay.views(flat), strict=True):
            assert n == vn and v.shape == t.shape and v.dtype == dtype
            assert torch.equal(v, t.to(dtype))
    lay.check(named)
    with pytest.raises(MathptError, match="changed"):
        lay.check(named[:2])


def test_named_weights_strips_wrappers_and_dedups_tied():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    m = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=32,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        )
    )
    names = [n for n, _ in named_weights(m)]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert names == [n for n, _ in named_weights({f"_orig_mod.{n}": t for n, t in m.named_parameters()})]


def test_resolve_mode():
    cpu, g0, g1 = torch.device("cpu"), torch.device("cuda:0"), torch.device("cuda:1")
    assert resolve_mode("auto", cpu, "cpu") == "shm"
    assert resolve_mode("auto", g1, "cuda:1") == "cuda_ipc"
    assert resolve_mode("auto", g0, "cuda:0") == "cuda_ipc"
    assert resolve_mode("auto", g0, "cuda:1") == "nccl"
    assert resolve_mode("disk", g0, "cuda:0") == "disk"
    with pytest.raises(MathptError, match="handoff 'bogus'"):
        resolve_mode("bogus", cpu, "cpu")


def test_job_order_evals_of_current_weights_then_rollouts():
    from collections import deque

    from mathpt.runtime.worker import Job

    kinds_versions = [("eval", 3), ("eval", 5), ("rollout", 5), ("eval", 4), ("rollout", 2), ("eval", 5)]
    jobs = deque(Job(i, k, ["p"], GREEDY, 0, None, v) for i, (k, v) in enumerate(kinds_versions))
    # on weights v5: the evals asked for v5 first, then rollouts, then older evals in order
    assert [_next_job(jobs, 5).job_id for _ in range(6)] == [1, 5, 2, 4, 0, 3]
    assert _next_job(jobs, 5) is None


def test_jobs_hold_the_weights_they_were_submitted_against():
    from collections import deque

    from mathpt.runtime.worker import Job, holds_weights

    jobs = deque([Job(0, "eval", ["p"], GREEDY, 0, None, 4), Job(1, "rollout", ["p"], GREEDY, 0, None, 5)])
    assert holds_weights(jobs, 5)  # the rollout asked for v5: v6 must wait
    assert _next_job(jobs, 5).job_id == 1
    assert not holds_weights(jobs, 5)  # only an older job is left: newer weights may load
    assert not holds_weights(deque(), 5)


class _FakeClient:
    """Records submissions; jobs 'run' with the newest pushed version, or a lagging one if told."""

    def __init__(self, lag: int = 0):
        self.pushed_version, self.lag, self.submitted = 0, lag, []

    def submit(self, kind, prompts, params, step, tag=None):
        self.submitted.append((step, self.pushed_version))
        return len(self.submitted) - 1

    def wait(self, job_id, timeout=None):
        step, min_version = self.submitted[job_id]
        return JobResult(job_id, "rollout", step, max(0, min_version - self.lag))


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_rollout_pipeline_keeps_jobs_ahead_within_staleness(staleness):
    client = _FakeClient()
    pipe = RolloutPipeline(client, GREEDY, lambda s: ([f"q{s}"], {"step": s}), max_staleness=staleness)
    for step in range(6):
        res = pipe.get(step)
        assert res.step == step
        assert client.pushed_version - res.weight_version <= staleness
        # every step up to step + staleness is queued; nothing further
        assert sorted(s for s, _ in client.submitted) == list(range(step + staleness + 1))
        client.pushed_version += 1  # the trainer's push after its update
    # each job was submitted with the weights of `staleness` steps before it (or the initial ones)
    assert all(v == max(0, s - staleness) for s, v in client.submitted)


def test_rollout_pipeline_rejects_stale_results():
    client = _FakeClient(lag=2)
    pipe = RolloutPipeline(client, GREEDY, lambda s: (["q"], None), max_staleness=1)
    client.pushed_version = 3
    with pytest.raises(MathptError, match="versions behind"):
        pipe.get(0)


def test_job_result_summary_and_errors():
    from mathpt.engines.base import Generation

    gens = [Generation(0, s, "t", list(range(n)), None, "length", 4) for s, n in enumerate([3, 5])]
    ok = JobResult(1, "eval", 7, 4, gens, elapsed_s=0.5, tag={"split": "val"})
    assert ok.summary() == {
        "job_id": 1,
        "kind": "eval",
        "step": 7,
        "weight_version": 4,
        "generations": 2,
        "tokens": 8,
        "elapsed_s": 0.5,
        "error": None,
        "tag": {"split": "val"},
    }
    assert ok.raise_for_error() is ok
    bad = JobResult(2, "eval", 8, 4, error="Traceback ...\nValueError: token id 9 out of range\n")
    assert bad.summary()["error"] == "ValueError: token id 9 out of range" and not bad.ok
    with pytest.raises(MathptError, match="eval job 2 \\(step 8\\) failed"):
        bad.raise_for_error()


def test_client_rejects_bad_arguments(tmp_path):
    with pytest.raises(MathptError, match="engine"):
        InferenceClient("nope", tmp_path)
    with pytest.raises(MathptError, match="device"):
        InferenceClient("hf", tmp_path, device="tpu")


# ---------------------------------------------------------------- helpers


def _perturbed(model_dir, seed: int, scale: float = 0.05):
    model = load_model(model_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _hf_greedy(model, model_dir, prompts=PROMPTS, params=GREEDY):
    return HFEngine.from_model(model, load_tokenizer(model_dir)).generate(prompts, params)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------- the real vLLM engine (one worker)


@pytest.fixture(scope="module")
def vllm_client(tiny_model_dir):
    pytest.importorskip("vllm")
    kw = dict(dtype="float32", max_model_len=512, gpu_memory_utilization=0.05)  # on CPU: 5% of RAM for KV
    with InferenceClient("vllm", tiny_model_dir, device="cpu", engine_kwargs=kw, heartbeat_timeout_s=30) as c:
        c.wait_ready()
        yield c


@pytest.mark.slow
def test_vllm_handoff_matches_hf_and_tags_versions(vllm_client, tiny_model_dir):
    c = vllm_client
    base = load_model(tiny_model_dir)
    r0 = c.wait(c.submit("eval", PROMPTS, GREEDY, step=0, tag={"split": "val"}))
    assert r0.ok and r0.weight_version == 0 and r0.tag == {"split": "val"} and r0.step == 0
    assert [g.token_ids for g in r0.generations] == [g.token_ids for g in _hf_greedy(base, tiny_model_dir)]

    prev = r0
    for version in (1, 2):
        model = _perturbed(tiny_model_dir, seed=version)
        blocked = c.push_weights(model, version)
        assert 0 <= blocked < 10
        job = c.submit("eval", PROMPTS, GREEDY, step=version)
        res = c.wait(job, timeout=60)
        assert res.ok, res.error
        assert res.weight_version == version and res.step == version
        assert all(g.weight_version == version for g in res.generations)
        ref = _hf_greedy(model, tiny_model_dir)
        assert [g.token_ids for g in res.generations] == [g.token_ids for g in ref]  # token for token
        for g, r in zip(res.generations, ref, strict=True):
            assert g.logprobs == pytest.approx(r.logprobs, abs=1e-4)
        assert [g.token_ids for g in res.generations] != [g.token_ids for g in prev.generations]
        prev = res
    assert c.weight_version == 2 and c.pushed_version == 2 and c.handoff_mode == "shm"
    with pytest.raises(MathptError, match="must exceed"):
        c.push_weights(base, 2)


@pytest.mark.slow
def test_vllm_poll_is_nonblocking_and_failed_jobs_are_reported(vllm_client):
    c = vllm_client
    t0 = time.perf_counter()
    ids = [c.submit("eval", PROMPTS, GREEDY, step=10 + i) for i in range(3)]
    bad = c.submit("eval", [[10**7]], GREEDY, step=13)  # a token id outside the vocabulary: vLLM rejects it
    got: list[JobResult] = c.poll()
    assert time.perf_counter() - t0 < 0.5  # submit and poll return at once
    deadline = time.monotonic() + 60
    while len(got) < 4 and time.monotonic() < deadline:
        got += c.poll(kind="eval")
        time.sleep(0.05)
    assert sorted(r.job_id for r in got) == sorted([*ids, bad])
    failed = [r for r in got if r.job_id == bad][0]
    assert not failed.ok and failed.generations == [] and failed.step == 13
    with pytest.raises(MathptError, match="failed in the inference worker"):
        failed.raise_for_error()
    assert all(r.ok and r.weight_version == c.weight_version for r in got if r.job_id != bad)
    with pytest.raises(MathptError, match="already returned by poll"):
        c.wait(ids[0])


@pytest.mark.slow
def test_vllm_one_step_ahead_rollouts(vllm_client, tiny_model_dir):
    c = vllm_client
    params = SamplingConfig(max_new_tokens=8, temperature=1.0, n=2, seed=0)
    pipe = RolloutPipeline(c, params, lambda s: (PROMPTS[:2], {"step": s}), max_staleness=1)
    start = c.pushed_version
    for k in range(3):
        res = pipe.get(k, timeout=60)
        assert res.tag == {"step": k} and len(res.generations) == 4
        assert c.pushed_version - res.weight_version <= 1
        c.push_weights(_perturbed(tiny_model_dir, seed=100 + k), start + k + 1)


@pytest.mark.slow
def test_vllm_killing_the_worker_fails_fast(vllm_client):
    """Runs last in this module: it kills the shared worker."""
    c = vllm_client
    job = c.submit("rollout", PROMPTS, SamplingConfig(max_new_tokens=200, temperature=1.0, n=8), step=99)
    pid = c.pid
    os.kill(pid, signal.SIGKILL)
    t0 = time.perf_counter()
    with pytest.raises(
        WorkerError, match=rf"pid {pid}\) was killed by SIGKILL.*unfinished jobs: \[(\d+, )*{job}\]"
    ):
        c.wait(job)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(WorkerError):  # the client stays failed
        c.poll()
    assert _wait_dead(pid, 5)


# ---------------------------------------------------------------- hf engine workers: hand-off modes and faults


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nccl", "disk"])
def test_handoff_modes_apply_new_weights(tiny_model_dir, mode):
    """``nccl`` runs over gloo on CPU: the same broadcast protocol as across two GPUs."""
    with InferenceClient("hf", tiny_model_dir, device="cpu", handoff=mode) as c:
        for version in (1, 2):
            model = _perturbed(tiny_model_dir, seed=version)
            c.push_weights(model, version)
            res = c.wait(c.submit("eval", PROMPTS, GREEDY, step=version), timeout=60)
            assert res.weight_version == version and c.handoff_mode == mode
            assert [g.token_ids for g in res.generations] == [
                g.token_ids for g in _hf_greedy(model, tiny_model_dir)
            ]


@pytest.mark.slow
def test_newest_pushed_version_wins_and_is_never_mixed(tiny_model_dir):
    params = SamplingConfig(max_new_tokens=64, temperature=1.0, n=4, seed=1)
    with InferenceClient("hf", tiny_model_dir, device="cpu") as c:
        models = {v: _perturbed(tiny_model_dir, seed=v) for v in (1, 2, 3)}
        busy = c.submit("rollout", PROMPTS, params, step=0)  # keeps the worker busy while we push
        for v in (1, 2, 3):
            c.push_weights(models[v], v)
        first = c.wait(busy, timeout=60)
        after = c.wait(c.submit("eval", PROMPTS, GREEDY, step=3), timeout=60)
        assert first.weight_version in (0, 1, 2, 3)
        assert after.weight_version == 3 and c.weight_version == 3
        assert [g.token_ids for g in after.generations] == [
            g.token_ids for g in _hf_greedy(models[3], tiny_model_dir)
        ]


@pytest.mark.slow
def test_hung_worker_is_detected_by_heartbeat(tiny_model_dir):
    with InferenceClient("hf", tiny_model_dir, device="cpu", heartbeat_timeout_s=2.0) as c:
        c.wait_ready()
        pid = c.pid
        os.kill(pid, signal.SIGSTOP)  # frozen: alive but silent
        t0 = time.perf_counter()
        try:
            with pytest.raises(WorkerError, match="no heartbeat"):
                c.wait(c.submit("eval", PROMPTS, GREEDY, step=0))
            assert time.perf_counter() - t0 < 6
        finally:
            if _alive(pid):
                os.kill(pid, signal.SIGCONT)
        assert _wait_dead(pid, 5)


@pytest.mark.slow
def test_worker_startup_failure_is_reported(tmp_path):
    with InferenceClient("hf", tmp_path / "missing", device="cpu") as c:
        with pytest.raises(WorkerError, match="the inference worker failed"):
            c.wait_ready(timeout=120)


_TRAINER = textwrap.dedent(
    """
    import signal, sys, time
    from mathpt.runtime import InferenceClient
    # a shell that starts the tests in the background (`cmd &`) makes SIGINT ignored in every
    # child: give this trainer Python's own Ctrl-C, as an interactive run has
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # no __main__ guard on purpose: the client must not re-run this script in the worker
    c = InferenceClient("hf", sys.argv[1], device="cpu").start()
    c.wait_ready()
    print(c.pid, flush=True)
    time.sleep(120)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_no_orphan_worker_after_trainer_dies(tiny_model_dir, tmp_path, sig):
    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path.parent), *sys.path])}
    p = subprocess.Popen(
        [sys.executable, str(script), str(tiny_model_dir)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        worker = int(p.stdout.readline())
        assert _alive(worker)
        p.send_signal(sig)
        p.wait(timeout=30)
        assert _wait_dead(worker, 10), f"worker {worker} survived the trainer's {sig.name}"
    finally:
        p.kill()
