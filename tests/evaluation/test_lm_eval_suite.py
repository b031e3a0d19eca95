"""lm-eval suite: local tasks offline, per-doc outputs checked against an independent reference,
fail-fast on hub tasks, task parallelism and the OpenAI-compatible server path."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from mathpt.data import to_row
from mathpt.evaluation.lm_eval_suite import (
    LOCAL_TASKS,
    assign_tasks,
    completions_url,
    per_doc_rows,
    run_lm_eval_suite,
)
from mathpt.io import DataError, MathptError, read_json, read_jsonl

LIMIT, SHOTS, GEN = 4, 2, 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """60 train and 10 test problems in the pipeline's row format, from the arith generator."""
    from mathpt.arith import generate_arith

    out = tmp_path_factory.mktemp("data")
    gen = generate_arith(60, 10, seed=1)
    for split in ("train", "test"):
        rows = [to_row(r, f"{split}-{i:05d}", f"{split}:{i + 1}") for i, r in enumerate(gen[split])]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def hf_suite(tiny_model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_eval") / "out"
    summary = run_lm_eval_suite(
        tiny_model_dir,
        list(LOCAL_TASKS),
        num_fewshot=SHOTS,
        backend="hf",
        out_dir=out,
        local_data_dir=data_dir,
        max_gen_toks=GEN,
        devices=["cpu"],
        limit=LIMIT,
        offline=True,
    )
    return summary, out


def _reference_loglikelihoods(model_dir, texts: list[str]) -> list[float]:
    """Independent float64 log p(text | end-of-text token), the single-window rolling loglikelihood."""
    from mathpt.models import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float64)
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            inp = torch.tensor([[tok.eos_token_id, *ids[:-1]]])
            logp = torch.log_softmax(model(inp).logits[0].double(), dim=-1)
            out.append(float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum()))
    return out


def test_local_tasks_offline_with_hf_backend(hf_suite, tiny_model_dir, data_dir):
    summary, out = hf_suite
    assert summary["lm_eval_version"] == importlib.metadata.version("lm_eval")
    assert set(summary["versions"]) == set(LOCAL_TASKS) and summary["offline"] is True
    assert summary["configs"]["gsm8k_local"]["generation_kwargs"]["max_gen_toks"] == GEN
    assert summary["n-shot"] == {"gsm8k_local": SHOTS, "wikitext_local": 0}
    test = read_jsonl(data_dir / "test.jsonl")[:LIMIT]

    # perplexity task: per-doc score is the doc's log-likelihood, checked against float64 torch
    rows = read_jsonl(out / "per_doc_wikitext_local.jsonl")
    assert [r["doc_id"] for r in rows] == list(range(LIMIT))
    texts = [r["question"] + "\n" + r["solution"] for r in test]
    ref = _reference_loglikelihoods(tiny_model_dir, texts)
    assert [r["score"] for r in rows] == pytest.approx(ref, rel=1e-4)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    ppl = summary["tasks"]["wikitext_local"]["lm_eval_results"]["word_perplexity,none"]
    assert ppl == pytest.approx(math.exp(-sum(ref) / words), rel=1e-3)

    # generation task: docs in test-file order, k train shots in the prompt, strict #### scoring
    train_q = {r["question"] for r in read_jsonl(data_dir / "train.jsonl")}
    samples = [s for s in read_jsonl(out / "samples_gsm8k_local.jsonl") if s["filter"] == "strict-match"]
    per_doc = read_jsonl(out / "per_doc_gsm8k_local.jsonl")
    assert [r["doc_id"] for r in per_doc] == [s["doc_id"] for s in samples] == list(range(LIMIT))
    for s, r, row in zip(samples, per_doc, test, strict=True):
        assert s["doc"]["id"] == row["id"]
        prompt = s["arguments"][0][0]
        shots = re.findall(r"Question: (.*?)\nAnswer:", prompt, flags=re.S)
        assert len(shots) == SHOTS + 1 and shots[-1] == row["question"]
        assert all(q in train_q for q in shots[:-1])
        m = re.search(r"#### (\-?[0-9\.\,]+)", s["resps"][0][0])
        expected = float(m is not None and m.group(1).replace(",", "").rstrip(".") == row["answer"])
        assert r["score"] == expected and r["metric"] == "exact_match"


def test_hub_task_fails_fast_offline(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    t0 = time.time()
    with pytest.raises(MathptError, match=r"\['mmlu'\].*offline.*gsm8k_local"):
        run_lm_eval_suite(
            tiny_model_dir,
            ["gsm8k_local", "mmlu"],
            num_fewshot=4,
            backend="hf",
            out_dir=tmp_path / "o",
            local_data_dir=data_dir,
            devices=["cpu"],
            offline=True,
        )
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # offline detected from the environment too
    with pytest.raises(MathptError, match="arc_challenge"):
        run_lm_eval_suite(
            tiny_model_dir,
            ["arc_challenge"],
            num_fewshot=4,
            backend="hf",
            out_dir=tmp_path / "o",
            devices=["cpu"],
        )
    assert time.time() - t0 < 5 and not (tmp_path / "o").exists()


def test_local_tasks_check_their_data(tiny_model_dir, data_dir, tmp_path):
    with pytest.raises(MathptError, match="local_data_dir"):
        run_lm_eval_suite(
            tiny_model_dir,
            ["wikitext_local"],
            num_fewshot=0,
            backend="hf",
            out_dir=tmp_path / "o",
            devices=["cpu"],
            offline=True,
        )
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text((data_dir / "train.jsonl").read_text())
    (bad / "test.jsonl").write_text('{"question": "q", "solution": "s", "answer": "1"}\n{"question": "q"}\n')
    with pytest.raises(DataError, match=re.escape(str(bad / "test.jsonl")) + ":2: missing key"):
        run_lm_eval_suite(
            tiny_model_dir,
            ["wikitext_local"],
            num_fewshot=0,
            backend="hf",
            out_dir=tmp_path / "o",
            local_data_dir=bad,
            devices=["cpu"],
            offline=True,
        )


def test_assign_tasks_covers_every_task_once_and_balances():
    tasks = [
        "hendrycks_math500",
        "mmlu",
        "arc_challenge",
        "hellaswag",
        "winogrande",
        "truthfulqa_mc2",
        "wikitext",
    ]
    for n in range(1, 9):
        groups = assign_tasks(tasks, n)
        assert sorted(t for g in groups for t in g) == sorted(tasks)
        assert len(groups) == min(n, len(tasks)) and groups == assign_tasks(tasks, n)
        assert all(g == sorted(g, key=tasks.index) for g in groups)
    two = assign_tasks(tasks, 2)
    assert "hendrycks_math500" in two[0] and "mmlu" in two[1]  # the two heaviest are split


def test_completions_url():
    for base in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/completions"):
        assert completions_url(base) == "http://h:8000/v1/completions"


def test_per_doc_rows_for_groups_and_perplexity():
    def sample(doc_id, filt, **metrics):
        return {"doc_id": doc_id, "filter": filt, "metrics": list(metrics), **metrics}

    samples = {
        "mmlu_a": [sample(1, "none", acc=0.0), sample(0, "none", acc=1.0)],
        "mmlu_b": [sample(0, "none", acc=1.0)],
        "wikitext": [
            sample(0, "none", word_perplexity=[-12.5, 3]),
            sample(1, "none", word_perplexity=[-4.0, 2]),
        ],
        "gsm8k_local": [
            sample(0, "strict-match", exact_match=0.0),
            sample(0, "flexible-extract", exact_match=1.0),
        ],
    }
    rows, metric, _ = per_doc_rows("mmlu", ["mmlu_a", "mmlu_b"], samples)
    assert [(r["doc_id"], r["score"]) for r in rows] == [
        ("mmlu_a/0", 1.0),
        ("mmlu_a/1", 0.0),
        ("mmlu_b/0", 1.0),
    ]
    assert metric == "acc"
    rows, _, _ = per_doc_rows("wikitext", ["wikitext"], samples)
    assert [(r["doc_id"], r["score"], r["metric"]) for r in rows] == [
        (0, -12.5, "loglikelihood"),
        (1, -4.0, "loglikelihood"),
    ]
    rows, _, filt = per_doc_rows("gsm8k_local", ["gsm8k_local"], samples)
    assert filt == "strict-match" and [r["score"] for r in rows] == [0.0]
    with pytest.raises(MathptError, match="no samples"):
        per_doc_rows("mmlu", ["mmlu_a", "mmlu_c"], samples)


@pytest.mark.slow
def test_task_parallel_workers_match_one_process(hf_suite, tiny_model_dir, data_dir, tmp_path):
    summary1, out1 = hf_suite
    summary2 = run_lm_eval_suite(
        tiny_model_dir,
        list(LOCAL_TASKS),
        num_fewshot=SHOTS,
        backend="hf",
        out_dir=tmp_path / "out",
        local_data_dir=data_dir,
        max_gen_toks=GEN,
        devices=["cpu", "cpu"],
        limit=LIMIT,
        offline=True,
    )
    assert [w["tasks"] for w in summary2["workers"]] == [["gsm8k_local"], ["wikitext_local"]]
    for task in LOCAL_TASKS:
        assert read_jsonl(tmp_path / "out" / f"per_doc_{task}.jsonl") == read_jsonl(
            out1 / f"per_doc_{task}.jsonl"
        )
    assert read_json(tmp_path / "out" / "summary.json")["versions"] == summary1["versions"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_local_completions_against_a_running_vllm_server(hf_suite, tiny_model_dir, data_dir, tmp_path):
    """The README's fast-iteration path: lm-eval's local-completions client against `vllm serve`."""
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(tiny_model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-model-len",
            "2048",
            "--enforce-eager",
            "--gpu-memory-utilization",
            "0.15",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.time() + 150
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"vLLM server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(1)
        summary = run_lm_eval_suite(
            tiny_model_dir,
            ["wikitext_local"],
            num_fewshot=0,
            backend="local-completions",
            base_url=f"http://127.0.0.1:{port}/v1",
            out_dir=tmp_path / "out",
            local_data_dir=data_dir,
            max_gen_toks=GEN,
            limit=LIMIT,
            offline=True,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert summary["workers"][0]["model_args"]["base_url"] == f"http://127.0.0.1:{port}/v1/completions"
    served = [r["score"] for r in read_jsonl(tmp_path / "out" / "per_doc_wikitext_local.jsonl")]
    local = [r["score"] for r in read_jsonl(hf_suite[1] / "per_doc_wikitext_local.jsonl")]
    assert served == pytest.approx(local, rel=1e-3)
