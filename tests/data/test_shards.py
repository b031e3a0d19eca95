"""mathpt.shards: tokenized SFT shards round-trip, drop over-long examples, verify their index."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mathpt.data import parse_gsm8k_answer
from mathpt.io import DataError, MathptError, read_jsonl, sha256_file, write_jsonl
from mathpt.models import load_tokenizer
from mathpt.prompts import format_prompt
from mathpt.shards import iter_sft_shards, read_index, tokenizer_sha256, write_prompt_set, write_sft_shards
from mathpt.teachers.gold import gold_traces

MB = 4


@pytest.fixture(scope="module")
def data_rows(word_problems):
    rows = []
    for i, raw in enumerate(word_problems[:30]):
        solution, gold = parse_gsm8k_answer(raw["answer"])
        rows.append(
            {"id": f"train-{i:05d}", "question": raw["question"], "solution": solution, "answer": gold}
        )
    return rows


@pytest.fixture(scope="module", params=["r1_zero", "qwen_boxed"])
def traces_path(request, data_rows, tmp_path_factory):
    traces = gold_traces(data_rows, request.param)
    for i, t in enumerate(traces):  # a mix of correct and incorrect rows for keep="correct"
        t["correct"] = i % 3 != 0
    path = tmp_path_factory.mktemp("traces") / "traces.jsonl"
    write_jsonl(path, traces)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def _rows(out_dir, **kw):
    """All stored rows as (input_ids, labels, mask) tensors of their true length, in iteration order."""
    out = []
    for mb in iter_sft_shards(out_dir, **kw):
        assert set(mb) == {"input_ids", "labels", "response_mask"}
        assert (
            mb["input_ids"].dtype == mb["labels"].dtype == torch.int64
            and mb["response_mask"].dtype == torch.bool
        )
        assert mb["response_mask"][:, -1].any()  # trimmed to the longest row
        for ids, labels, mask in zip(mb["input_ids"], mb["labels"], mb["response_mask"], strict=True):
            n = int(mask.nonzero().max()) + 1
            out.append((ids, labels, mask, n))
    return out


def test_round_trip(traces_path, tiny_model_dir, tokenizer, tmp_path):
    traces = {t["id"]: t for t in read_jsonl(traces_path)}
    index = write_sft_shards(
        traces_path, tiny_model_dir, tmp_path, max_seq_len=4096, microbatch_size=MB, rows_per_shard=10, seed=1
    )
    assert [f["name"] for f in index["files"]] == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
        "shard-00003.safetensors",
    ]
    assert [f["rows"] for f in index["files"]] == [8, 8, 8, 6]  # 10 rounded down to a multiple of MB
    assert index["counts"] | {"tokens": 0, "response_tokens": 0} == {
        "traces": 30,
        "filtered_incorrect": 0,
        "dropped_too_long": 0,
        "examples": 30,
        "microbatches": 8,
        "tokens": 0,
        "response_tokens": 0,
    }
    assert index["tokenizer"]["sha256"] == tokenizer_sha256(tokenizer)
    assert index["traces"]["sha256"] == sha256_file(traces_path)
    for f in index["files"]:
        assert sha256_file(tmp_path / f["name"]) == f["sha256"]

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    rows = _rows(tmp_path)
    assert len(rows) == 30
    assert sorted(i for i, _ in index["rows"]) == sorted(traces)
    n_tokens = n_resp = 0
    for (ids, labels, mask, n), (tid, _) in zip(rows, index["rows"], strict=True):
        t = traces[tid]
        full = torch.cat([ids[:n], labels[n - 1 : n]]).tolist()
        text = tokenizer.decode(full, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert text == t["prompt"] + t["response"] + tokenizer.eos_token
        assert labels[: n - 1].tolist() == ids[1:n].tolist()  # labels are inputs shifted by one
        n_prompt = n + 1 - int(mask.sum())
        assert not mask[: n_prompt - 1].any() and mask[n_prompt - 1 : n].all()  # exactly the response
        assert tokenizer.decode(full[:n_prompt], clean_up_tokenization_spaces=False) == t["prompt"]
        resp = tokenizer.decode(
            labels[mask].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        assert resp == t["response"] + tokenizer.eos_token and labels[n - 1] == eos
        assert (ids[n:] == pad).all() and (labels[n:] == pad).all() and not mask[n:].any()
        n_tokens += n + 1
        n_resp += int(mask.sum())
    assert index["counts"]["tokens"] == n_tokens and index["counts"]["response_tokens"] == n_resp
    assert index["longest_example"] == max(r[3] for r in rows) + 1


def test_deterministic_and_reshuffle(traces_path, tiny_model_dir, tmp_path):
    kw = {"max_seq_len": 4096, "microbatch_size": MB}
    a = write_sft_shards(traces_path, tiny_model_dir, tmp_path / "a", seed=0, **kw)
    b = write_sft_shards(traces_path, tiny_model_dir, tmp_path / "b", seed=0, **kw)
    c = write_sft_shards(traces_path, tiny_model_dir, tmp_path / "c", seed=5, **kw)
    assert a["files"] == b["files"] and a["rows"] == b["rows"]
    assert a["rows"] != c["rows"] and sorted(a["rows"]) == sorted(c["rows"])

    def key(r):
        return tuple(r[0][: r[3]].tolist())

    plain = [key(r) for r in _rows(tmp_path / "a")]
    shuffled = [key(r) for r in _rows(tmp_path / "a", shuffle_seed=3)]
    assert Counter(plain) == Counter(shuffled) and plain != shuffled
    assert shuffled == [key(r) for r in _rows(tmp_path / "a", shuffle_seed=3)]
    sizes = [mb["input_ids"].shape[0] for mb in iter_sft_shards(tmp_path / "a", drop_last=True)]
    assert sizes == [MB] * (30 // MB)


def test_overlong_dropped_and_counted(traces_path, tiny_model_dir, tokenizer, tmp_path):
    traces = read_jsonl(traces_path)
    lengths = {
        t["id"]: len(tokenizer.encode(t["prompt"], add_special_tokens=False))
        + len(tokenizer.encode(t["response"] + tokenizer.eos_token, add_special_tokens=False))
        for t in traces
    }
    limit = sorted(lengths.values())[len(lengths) // 2]
    index = write_sft_shards(traces_path, tiny_model_dir, tmp_path, max_seq_len=limit, microbatch_size=MB)
    too_long = {i for i, n in lengths.items() if n > limit}
    assert too_long and index["counts"]["dropped_too_long"] == len(too_long)
    assert {d["id"] for d in index["dropped"]} == too_long
    assert {i for i, _ in index["rows"]} == set(lengths) - too_long
    assert index["counts"]["examples"] == 30 - len(too_long)
    assert index["longest_example"] <= limit
    assert all(f["seq_len"] <= limit - 1 for f in index["files"])
    assert sum(1 for _ in _rows(tmp_path)) == 30 - len(too_long)
    with pytest.raises(MathptError, match="no example left"):
        write_sft_shards(traces_path, tiny_model_dir, tmp_path / "none", max_seq_len=5, microbatch_size=MB)


def test_keep_correct(traces_path, tiny_model_dir, tmp_path):
    traces = read_jsonl(traces_path)
    index = write_sft_shards(
        traces_path, tiny_model_dir, tmp_path, max_seq_len=4096, microbatch_size=MB, keep="correct"
    )
    correct = {t["id"] for t in traces if t["correct"]}
    assert {i for i, _ in index["rows"]} == correct
    assert index["counts"]["filtered_incorrect"] == 30 - len(correct)
    with pytest.raises(MathptError, match="keep"):
        write_sft_shards(
            traces_path, tiny_model_dir, tmp_path / "x", max_seq_len=64, microbatch_size=MB, keep="good"
        )


def test_index_verification(traces_path, tiny_model_dir, tmp_path):
    write_sft_shards(
        traces_path, tiny_model_dir, tmp_path, max_seq_len=4096, microbatch_size=MB, rows_per_shard=16
    )
    assert read_index(tmp_path)["counts"]["examples"] == 30
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard-00001.safetensors: sha256 differs"):
        next(iter_sft_shards(tmp_path))
    shard.unlink()
    with pytest.raises(DataError, match="shard-00001.safetensors: shard listed in index.json is missing"):
        next(iter_sft_shards(tmp_path))
    with pytest.raises(DataError, match="index.json: file not found"):
        next(iter_sft_shards(tmp_path / "nowhere"))


def test_malformed_traces(tmp_path, tiny_model_dir):
    path = tmp_path / "t.jsonl"
    write_jsonl(
        path, [{"id": "a", "prompt": "p", "response": "r", "correct": True}, {"id": "b", "prompt": "p"}]
    )
    with pytest.raises(DataError, match=r"t.jsonl:2: missing key"):
        write_sft_shards(path, tiny_model_dir, tmp_path / "o", max_seq_len=64, microbatch_size=2)
    write_jsonl(path, [{"id": "a", "prompt": "p", "response": "r", "correct": "yes"}])
    with pytest.raises(DataError, match="'correct' must be true or false"):
        write_sft_shards(path, tiny_model_dir, tmp_path / "o", max_seq_len=64, microbatch_size=2)


@pytest.mark.parametrize("style", ["r1_zero", "qwen_boxed"])
def test_write_prompt_set(data_rows, tmp_path, style):
    n = write_prompt_set(data_rows, style, tmp_path / "p.jsonl")
    out = read_jsonl(tmp_path / "p.jsonl")
    assert n == len(out) == len(data_rows)
    for r, o in zip(data_rows, out, strict=True):
        assert o == {"id": r["id"], "prompt": format_prompt(r["question"], style), "answer": r["answer"]}
    with pytest.raises(DataError, match="id=x"):
        write_prompt_set([{"id": "x", "question": "q"}], style, tmp_path / "bad.jsonl")


def test_load_sft_examples_holds_every_row_in_storage_order(traces_path, tiny_model_dir, tmp_path):
    from mathpt.shards import load_sft_examples

    write_sft_shards(
        traces_path, tiny_model_dir, tmp_path, max_seq_len=4096, microbatch_size=MB, rows_per_shard=8
    )
    ex = load_sft_examples(tmp_path)
    assert set(ex) == {"input_ids", "labels", "response_mask"} and ex["input_ids"].shape[0] == 30
    assert ex["response_mask"].dtype == torch.bool and ex["input_ids"].dtype == torch.int64
    stored = [
        (ids[:n].tolist(), labels[:n].tolist(), mask[:n].tolist()) for ids, labels, mask, n in _rows(tmp_path)
    ]
    for i, (ids, labels, mask) in enumerate(stored):
        n = len(ids)
        assert ex["input_ids"][i, :n].tolist() == ids and ex["labels"][i, :n].tolist() == labels
        assert ex["response_mask"][i, :n].tolist() == mask and not ex["response_mask"][i, n:].any()
