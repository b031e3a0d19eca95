"""The one-GPU memory planner: its calibration, its choices on fake cards, its refusals, and its hook
through train_pg with a mocked CUDA memory query (CPU only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mathpt.config import ConfigError, eval_shards, load_config, validate_config
from mathpt.io import MathptError
from mathpt.runtime import memory as mem
from mathpt.runtime.memory import GIB, ModelShape, RunSizes, plan

REPO = Path(__file__).resolve().parents[2]
REF = ModelShape.from_config(yaml.safe_load((REPO / "bench" / "qwen2.5-math-1.5b-shape.yaml").read_text()))
TINY = ModelShape.from_config(yaml.safe_load((REPO / "bench" / "tiny-shape.yaml").read_text()))
H100 = int(79.19 * GIB)  # what torch reports for an H100 80 GB
SMOKE = ModelShape.from_config(
    dict(vocab_size=24700, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
         num_attention_heads=12, num_key_value_heads=2)
)  # fmt: skip
REF_PG = RunSizes("pg", rows=512, seq=256 + 2048, behaviour_copy=True, sleep=False, bf16=True)
SMOKE_PG = RunSizes("pg", rows=128, seq=256 + 256, behaviour_copy=True, sleep=False, bf16=True)


def _plan(shape, sizes, mbt, util, total=H100, free=None, layout="one_gpu"):
    return plan(shape, sizes, layout, total - int(0.5 * GIB) if free is None else free, total, mbt, util)


def test_param_count_matches_a_built_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = yaml.safe_load((REPO / "bench" / "tiny-shape.yaml").read_text())
    model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    assert TINY.params == sum(p.numel() for p in model.parameters())
    assert 1.50e9 < REF.params < 1.56e9  # Qwen2.5-Math-1.5B: 1.54 B


def test_calibration_covers_every_measured_point():
    implied = {k: mem.implied_calibration(k) for k in mem.MEASURED}
    assert max(implied.values()) <= mem.ACT_CALIBRATION < max(implied.values()) + 0.02, implied
    # the calibrated model predicts at least every measured peak (it adds the fp32 gradient buffer)
    for name, (params, layers, h, i, kv, per_param, tokens, peak) in mem.MEASURED.items():
        shape = ModelShape(int(params), layers, h, i, kv, 1)
        b = mem.trainer_budget(shape, tokens, behaviour_copy=per_param == 18, fp32_grads=False)
        assert (sum(b.values()) - b["cuda_context"]) / GIB >= peak, name


def test_measured_working_point_fits_and_the_shipped_smoke_values_are_refused():
    p = _plan(SMOKE, SMOKE_PG, 4096, 0.30)
    assert p.gpu_memory_utilization == 0.30 and p.microbatch_tokens == 4096
    for util, mbt in ((0.45, 16384), (0.30, 16384)):  # both OOMed on the H100
        with pytest.raises(MathptError, match=r"train\.pg\.microbatch_tokens <= \d+") as e:
            _plan(SMOKE, SMOKE_PG, mbt, util)
        assert f"runtime.gpu_memory_utilization {util:.2f}" in str(e.value)
    assert _plan(REF, REF_PG, 4096, 0.30).peak_bytes() < H100


@pytest.mark.parametrize("gb", [24, 40, 48, 80, 141])
def test_reference_shape_on_cards_of_each_size(gb):
    total = H100 if gb == 80 else int(gb * 1e9)
    if gb < 80:  # 1.5B with fp32 masters, moments and a behaviour copy: ~32 GiB before one token
        with pytest.raises(MathptError, match="no token budget fits.*runtime.layout two_gpu"):
            _plan(REF, REF_PG, "auto", "auto", total)
        return
    p = _plan(REF, REF_PG, "auto", "auto", total)
    assert p.peak_bytes() + mem.HEADROOM_BYTES <= p.free
    assert p.microbatch_tokens >= 4096 and p.kv_rows >= 256  # half the batch at full length, at least
    assert 0.2 <= p.gpu_memory_utilization <= 0.5


def test_auto_prefers_the_whole_batch_in_the_kv_cache_and_honours_explicit_values():
    p = _plan(SMOKE, SMOKE_PG, "auto", "auto")
    assert p.kv_rows >= 128 and p.microbatch_tokens >= 4096
    q = _plan(SMOKE, SMOKE_PG, "auto", 0.45)  # a set share: the largest budget beside it
    assert q.gpu_memory_utilization == 0.45 and q.chosen["runtime.gpu_memory_utilization"] == "set"
    assert _plan(SMOKE, SMOKE_PG, 8192, "auto").microbatch_tokens == 8192


def test_two_gpu_checks_the_trainer_card_alone():
    p = _plan(REF, REF_PG, "auto", "auto", layout="two_gpu")
    assert p.gpu_memory_utilization is None and not p.worker and p.microbatch_tokens >= 8192
    assert _plan(REF, REF_PG, 32768, "auto", layout="two_gpu").microbatch_tokens == 32768  # set: a warning
    with pytest.raises(MathptError, match="trainer needs"):
        _plan(REF, REF_PG, "auto", "auto", total=int(24e9), layout="two_gpu")


def test_sleep_lets_the_trainer_use_the_workers_memory():
    asleep = RunSizes("pg", 512, 2304, behaviour_copy=False, sleep=True, bf16=True)
    awake = RunSizes("pg", 512, 2304, behaviour_copy=False, sleep=False, bf16=True)
    a, b = _plan(REF, asleep, "auto", "auto"), _plan(REF, awake, "auto", "auto")
    assert a.microbatch_tokens >= b.microbatch_tokens and a.gpu_memory_utilization > b.gpu_memory_utilization


def test_tiny_shape_fits_a_24_gb_card():
    p = _plan(TINY, RunSizes("pg", 8, 64, True, False, False), "auto", "auto", total=int(24e9))
    assert p.microbatch_tokens == mem.TOKEN_CHOICES[0]


# ---- config: auto defaults, eval shards, sleep -------------------------------------------------------


def _config(**runtime):
    cfg = yaml.safe_load((REPO / "config" / "gpu-smoke.yaml").read_text())
    cfg["runtime"].update(runtime)
    return cfg


def test_eval_shards_follow_the_layout():
    for layout, n in (("cpu", 1), ("one_gpu", 1), ("two_gpu", 2)):
        cfg = _config(layout=layout)
        cfg["eval"]["gsm8k"]["num_shards"] = "auto"
        validate_config(cfg)
        assert eval_shards(cfg) == n
    cfg = _config(layout="one_gpu")
    cfg["eval"]["gsm8k"]["num_shards"] = 2
    with pytest.raises(ConfigError, match="eval.gsm8k.num_shards.*one_gpu gives inference 1"):
        validate_config(cfg)


def test_sleep_between_rollouts_needs_one_gpu_and_staleness_0():
    with pytest.raises(ConfigError, match="staleness 0"):
        validate_config(_config(sleep_between_rollouts=True))  # gpu-smoke trains at staleness 1
    with pytest.raises(ConfigError, match="one_gpu layout"):
        validate_config(_config(sleep_between_rollouts=True, layout="two_gpu"))
    cfg = _config(sleep_between_rollouts=True)
    cfg["train"]["pg"]["staleness"] = 0
    validate_config(cfg)


def test_defaults_are_auto_and_cpu_engines_get_the_default_kv_cache():
    from mathpt.config import engine_kwargs

    cfg = load_config(REPO / "config" / "config.yaml")
    schema_defaults = _config()
    for k in ("gpu_memory_utilization",):
        del schema_defaults["runtime"][k]
    validate_config(schema_defaults)
    assert schema_defaults["runtime"]["gpu_memory_utilization"] == "auto"
    rt = {**cfg["runtime"], "gpu_memory_utilization": "auto"}
    assert engine_kwargs(rt, "vllm")["gpu_memory_utilization"] is None  # cpu: 256 MiB KV cache
    assert engine_kwargs({**rt, "layout": "one_gpu"}, "vllm")["gpu_memory_utilization"] == 0.85


# ---- the hook through train_pg -----------------------------------------------------------------------


def _pg_cfg(layout: str, **pg):
    from mathpt.config import rule_slice

    cfg = rule_slice(load_config(REPO / "config" / "config.yaml"), "train", algo="grpo_clip", seed=0)
    cfg["dtype"] = "float32"
    cfg["runtime"] = {**cfg["runtime"], "layout": layout, "engine": "hf", "gpu_memory_utilization": "auto"}
    cfg["pg"].update(n_steps=1, rollout_batch_size=4, group_size=2, minibatch_size=4, microbatch_size=2,
                     max_new_tokens=4, eval_every=10_000, checkpoint_every=10_000, val_max_new_tokens=2,
                     microbatch_tokens="auto", **pg)  # fmt: skip
    return cfg


def _train_pg(tmp_path, model_dir, monkeypatch, cfg, free_total):
    """train_pg on CPU as if on one GPU: the memory query is mocked and the devices are CPU."""
    import mathpt.gpus
    import mathpt.train.pg as pg_mod
    import mathpt.train.run as run_mod
    from tests.train.test_pg_offpolicy import InlineClient

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: free_total)
    monkeypatch.setattr(mathpt.gpus, "devices_for", lambda layout: ("cpu", "cpu"))
    seen = {}

    class Client(InlineClient):
        def __init__(self, **kw):
            seen.update(kw)
            super().__init__(**kw)

    monkeypatch.setattr(run_mod, "InferenceClient", Client)
    rows = [{"id": f"p{i}", "prompt": f"Question {i}?", "answer": str(i)} for i in range(4)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pg_mod.train_pg(cfg, init_dir=str(model_dir), train_prompts_path=str(prompts), val_prompts_path=str(prompts),
                    out_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "st"))  # fmt: skip
    return seen


def test_train_pg_plans_before_training_and_logs_the_plan(tmp_path, tiny_model_dir, monkeypatch):
    from mathpt.tracking import read_metrics

    cfg = _pg_cfg("one_gpu")
    seen = _train_pg(tmp_path, tiny_model_dir, monkeypatch, cfg, (20 * GIB, 24 * GIB))
    util = cfg["runtime"]["gpu_memory_utilization"]  # resolved in place, before the worker started
    assert isinstance(util, float) and 0 < util < 1 and cfg["pg"]["microbatch_tokens"] in mem.TOKEN_CHOICES
    assert seen["sleep_when_idle"] is False
    (row,) = read_metrics(tmp_path / "run" / "metrics.jsonl", kind="memory_plan")
    assert (
        row["gpu_memory_utilization"] == util and row["microbatch_tokens"] == cfg["pg"]["microbatch_tokens"]
    )
    (peaks,) = read_metrics(tmp_path / "run" / "metrics.jsonl", kind="memory_peaks")
    assert peaks["planned_trainer_gib"] == pytest.approx(row["trainer_gib"])


def test_train_pg_refuses_before_loading_the_model(tmp_path, tiny_model_dir, monkeypatch):
    import mathpt.train.run as run_mod

    def boom(*a, **k):
        raise AssertionError("the model was loaded: the planner must refuse first")

    monkeypatch.setattr(run_mod, "load_policy", boom)
    cfg = _pg_cfg("one_gpu")
    with pytest.raises(MathptError, match=r"does not fit one 0 GiB GPU"):
        _train_pg(tmp_path, tiny_model_dir, monkeypatch, cfg, (int(0.3 * GIB), int(0.4 * GIB)))


def test_cpu_layout_plans_nothing(tmp_path, tiny_model_dir, monkeypatch):
    def no_cuda(device=None):
        raise AssertionError("queried CUDA memory on the cpu layout")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_cuda)
    cfg = _pg_cfg("cpu")
    assert mem.resolve_memory(cfg, str(tiny_model_dir)) is None
    assert cfg["pg"]["microbatch_tokens"] == mem.CPU_MICROBATCH_TOKENS["pg"]


# ---- the worker's sleep wiring (vLLM's sleep mode is CUDA-only: a fake engine here) ----------------


class FakeEngine:
    def __init__(self):
        self.weight_version, self.events = 0, []

    def generate(self, prompts, params):
        from mathpt.engines.base import Generation

        self.events.append("generate")
        return [
            Generation(i, 0, "x", [1], None, "stop", self.weight_version, [1]) for i in range(len(prompts))
        ]

    def sleep(self):
        self.events.append("sleep")

    def wake_up(self):
        self.events.append("wake")


def test_worker_sleeps_before_returning_the_last_job_and_wakes_for_the_next():
    import queue

    from mathpt.engines.base import SamplingConfig
    from mathpt.runtime.worker import IdleSleep, Job, _serve

    engine, job_q, result_q = FakeEngine(), queue.Queue(), queue.Queue()
    job = lambda i: ("job", Job(i, "rollout", ["p"], SamplingConfig(), i, None, 0))  # noqa: E731
    job_q.put(job(0))
    job_q.put(("stop",))
    idle = IdleSleep(engine, True)
    _serve(engine, {"receiver": None}, job_q, result_q, idle)
    assert engine.events == ["generate", "sleep"] and idle.asleep
    assert result_q.get_nowait()[1].ok  # the result went back after the engine slept
    job_q.put(job(1))
    job_q.put(("stop",))
    _serve(engine, {"receiver": None}, job_q, result_q, idle)
    assert engine.events[2:] == ["wake", "generate", "sleep"] and idle.sleeps == 2
    assert IdleSleep(engine, False).enabled is False


def test_client_kwargs_turn_sleep_on_only_for_staleness_0_pg_on_one_gpu():
    from mathpt.train.run import client_kwargs

    cfg = _pg_cfg("one_gpu", staleness=0)
    cfg["runtime"].update(sleep_between_rollouts=True, engine="vllm", gpu_memory_utilization=0.3)
    kw = client_kwargs(cfg, "m", "cuda:0")
    assert kw["sleep_when_idle"] and kw["engine_kwargs"]["enable_sleep_mode"]
    cfg["pg"]["staleness"] = 1
    assert not client_kwargs(cfg, "m", "cuda:0")["sleep_when_idle"]
