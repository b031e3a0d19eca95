"""The local-model teacher (k samples per prompt through mathpt.engines) and the gold teacher via dispatch."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from conftest import data_rows

import mathpt.engines
from mathpt.engines import Generation, SamplingConfig
from mathpt.io import MathptError, read_json, read_jsonl
from mathpt.prompts import format_prompt, stop_strings
from mathpt.rewards import get_reward_fn
from mathpt.teachers.dispatch import generate_traces, select_traces, summary_path
from mathpt.teachers.local import model_fingerprint


@pytest.fixture
def rows(word_problems) -> list[dict]:
    return data_rows(word_problems, 4)


class ScriptedEngine:
    """Answers prompt j: sample 0 right, other samples wrong (and says it, as an engine would)."""

    instances: list[ScriptedEngine] = []

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.calls: list[tuple[list[str], SamplingConfig]] = []
        self.closed = False
        ScriptedEngine.instances.append(self)

    def generate(self, prompts: list[str], params: SamplingConfig) -> list[Generation]:
        self.calls.append((prompts, params))
        out = []
        for pi, p in enumerate(prompts):
            gold = next(r["answer"] for r in self.rows if r["question"] in p)
            for si in range(params.n):
                ans = gold if si == 0 else str(int(gold) + si)
                text = f" I'll put the final answer in answer tags.\nWorking it out gives {ans}.</think> <answer>{ans}</answer>"
                out.append(Generation(pi, si, text, list(range(5)), None, "stop", 0, list(range(11))))
        return out

    def close(self) -> None:
        self.closed = True


def _scripted(monkeypatch, rows):
    ScriptedEngine.instances.clear()
    made = []

    def make_engine(name, model_path, **kw):
        made.append((name, model_path, kw))
        return ScriptedEngine(rows)

    monkeypatch.setattr(mathpt.engines, "make_engine", make_engine)
    return made


def test_local_teacher_samples_k_grades_and_keeps_correct(tiny_model_dir, rows, tmp_path, monkeypatch):
    made = _scripted(monkeypatch, rows)
    cfg = {
        "kind": "local",
        "keep": "correct",
        "model_path": str(tiny_model_dir),
        "engine": "vllm",
        "engine_kwargs": {"max_model_len": 512},
        "samples_per_prompt": 3,
        "max_tokens": 64,
        "batch_size": 3,
        "temperature": 1.0,
        "progress": False,
    }
    out = tmp_path / "traces.jsonl"
    summary = generate_traces(cfg, rows, "r1_zero", out, tmp_path / "work")

    assert made == [("vllm", str(tiny_model_dir), {"max_model_len": 512})]
    eng = ScriptedEngine.instances[0]
    assert eng.closed
    assert [len(p) for p, _ in eng.calls] == [3, 1]  # batch_size prompts per generate call
    params = eng.calls[0][1]
    assert (params.n, params.max_new_tokens, params.temperature) == (3, 64, 1.0)
    assert list(params.stop) == stop_strings("r1_zero")
    assert eng.calls[0][0][0] == format_prompt(rows[0]["question"], "r1_zero")

    traces = read_jsonl(out)
    assert [(t["id"], t["sample_index"]) for t in traces] == [(r["id"], i) for r in rows for i in range(3)]
    assert [t["correct"] for t in traces] == [i == 0 for _ in rows for i in range(3)]
    reward = get_reward_fn("r1_zero")
    assert all(reward(t["response"], t["answer"])["reward"] == float(t["correct"]) for t in traces)
    assert all("answer tags" not in t["response"] for t in traces)  # cleaned like any teacher
    kept = select_traces(traces, cfg["keep"])
    assert [(t["id"], t["sample_index"]) for t in kept] == [(r["id"], 0) for r in rows]
    assert select_traces(traces, "all") == traces
    assert (
        summary["n_traces"] == 12
        and summary["n_correct"] == 4
        and summary["prompts_with_a_correct_trace"] == 4
    )
    assert summary["accounting"]["tokens"] == {"prompt_tokens": 12 * 11, "completion_tokens": 12 * 5}
    assert read_json(summary_path(out)) == summary

    # Resume: everything cached, no engine is even built.
    made.clear()
    again = generate_traces(cfg, rows, "r1_zero", out, tmp_path / "work")
    assert made == [] and again["accounting"]["calls_new"] == 0 and read_jsonl(out) == traces


def test_changed_model_weights_are_not_served_from_cache(tiny_model_dir, rows, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    fp = model_fingerprint(model)
    made = _scripted(monkeypatch, rows)
    cfg = {"kind": "local", "model_path": str(model), "engine": "hf", "max_tokens": 8, "progress": False}
    generate_traces(cfg, rows, "qwen_boxed", tmp_path / "t.jsonl", tmp_path / "work")
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # "retrained"
    weights.write_bytes(bytes(data))
    assert model_fingerprint(model) != fp
    generate_traces(cfg, rows, "qwen_boxed", tmp_path / "t.jsonl", tmp_path / "work")
    assert len(made) == 2


def test_local_teacher_with_the_real_hf_engine(tiny_model_dir, rows, tmp_path):
    cfg = {
        "kind": "local",
        "model_path": str(tiny_model_dir),
        "engine": "hf",
        "samples_per_prompt": 2,
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 3,
        "progress": False,
    }
    s = generate_traces(cfg, rows[:2], "qwen_boxed", tmp_path / "t.jsonl", tmp_path / "work")
    traces = read_jsonl(tmp_path / "t.jsonl")
    assert len(traces) == 4 and s["accounting"]["calls_new"] == 4
    assert all(t["prompt"] == format_prompt(t["question"], "qwen_boxed") for t in traces)
    assert all(t["response"].rstrip().endswith("}.") for t in traces)  # style format, answer or not
    assert 0 < s["accounting"]["tokens"]["completion_tokens"] <= 4 * 12


def test_gold_teacher_through_dispatch(rows, tmp_path):
    s = generate_traces(
        {"kind": "gold", "keep": "all"}, rows, "r1_zero", tmp_path / "g.jsonl", tmp_path / "w"
    )
    traces = read_jsonl(tmp_path / "g.jsonl")
    assert s["n_traces"] == len(rows) == s["n_correct"] and s["teacher"] == "gold"
    reward = get_reward_fn("r1_zero")
    assert all(reward(t["response"], r["answer"])["reward"] == 1.0 for t, r in zip(traces, rows, strict=True))


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"kind": "oracle"}, "teacher.kind"),
        ({"kind": "local"}, "teacher.model_path"),
        ({"kind": "local", "model_path": "/nonexistent/model"}, "not a model directory"),
    ],
)
def test_bad_teacher_config_names_the_key(cfg, match, rows, tmp_path):
    with pytest.raises(MathptError, match=match):
        generate_traces(cfg, rows, "r1_zero", tmp_path / "t.jsonl", tmp_path / "w")


def test_select_traces_rejects_unknown_keep():
    with pytest.raises(MathptError, match="teacher.keep"):
        select_traces([], "best")


def test_rows_missing_keys_are_named(tmp_path):
    with pytest.raises(MathptError, match=r"row 1 \(id=b\).*'answer'"):
        generate_traces(
            {"kind": "gold"},
            [{"id": "a", "question": "q", "answer": "1"}, {"id": "b", "question": "q"}],
            "r1_zero",
            tmp_path / "t.jsonl",
            tmp_path / "w",
        )


def test_local_teacher_truncated_sample_is_never_correct(tiny_model_dir, rows, tmp_path, monkeypatch):
    """A sample the engine cut at max_tokens ("length") is recorded and counted, never correct."""
    _scripted(monkeypatch, rows)
    orig = ScriptedEngine.generate

    def generate(self, prompts, params):
        gens = orig(self, prompts, params)
        return [dataclasses.replace(g, finish_reason="length") if g.sample_index == 0 else g for g in gens]

    monkeypatch.setattr(ScriptedEngine, "generate", generate)
    cfg = {
        "kind": "local",
        "model_path": str(tiny_model_dir),
        "engine": "vllm",
        "samples_per_prompt": 2,
        "max_tokens": 64,
        "progress": False,
    }
    summary = generate_traces(cfg, rows, "r1_zero", tmp_path / "t.jsonl", tmp_path / "work")
    traces = read_jsonl(tmp_path / "t.jsonl")
    assert [t["finish_reason"] for t in traces] == ["length", "stop"] * len(rows)
    assert not any(t["correct"] for t in traces)  # sample 0 had the right answer, but was cut
    assert summary["n_truncated"] == len(rows) and summary["n_correct"] == 0
