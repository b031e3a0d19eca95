"""mathpt.data: GSM8K -> train/val/test jsonl + manifest."""

from __future__ import annotations

import json
import re

import pytest

from mathpt.data import ENV_DIR, parse_gsm8k_answer, prepare_data, strip_calculator_annotations
from mathpt.io import DataError, MathptError, read_jsonl, sha256_file

GSM8K_SHA256 = {
    "train": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    "test": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
}


@pytest.fixture(autouse=True)
def _no_env_dir(monkeypatch):
    monkeypatch.delenv(ENV_DIR, raising=False)


@pytest.fixture(scope="module")
def prepared(gsm8k_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    manifest = prepare_data({"name": "gsm8k", "dir": str(gsm8k_dir)}, out, val_size=512, seed=0)
    return out, manifest


def test_real_gsm8k_counts_and_manifest(prepared, gsm8k_dir):
    out, manifest = prepared
    rows = {s: read_jsonl(out / f"{s}.jsonl") for s in ("train", "val", "test")}
    assert {s: len(r) for s, r in rows.items()} == {"train": 6961, "val": 512, "test": 1319}
    assert manifest["counts"] == {"train": 6961, "val": 512, "test": 1319}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for s in ("train", "test"):
        assert (
            manifest["source"]["inputs"][s]["sha256"]
            == GSM8K_SHA256[s]
            == sha256_file(gsm8k_dir / f"{s}.jsonl")
        )
    for s in ("train", "val", "test"):
        assert manifest["outputs"][s]["sha256"] == sha256_file(out / f"{s}.jsonl")
    assert manifest["seed"] == 0 and manifest["val_size"] == 512


def test_rows_follow_contract(prepared, gsm8k_train_rows):
    out, _ = prepared
    train_ids, val_ids = set(), set()
    for split, ids in (("train", train_ids), ("val", val_ids)):
        for row in read_jsonl(out / f"{split}.jsonl"):
            assert set(row) == {"id", "question", "solution", "answer"}
            assert "<<" not in row["solution"] and "####" not in row["solution"]
            assert re.fullmatch(r"-?\d+", row["answer"])
            raw = gsm8k_train_rows[int(row["id"].removeprefix("train-"))]
            assert raw["question"].strip() == row["question"]
            # Independent check of the gold: the last line of the raw answer.
            last = raw["answer"].strip().splitlines()[-1]
            assert last.startswith("#### ") and last[5:].replace(",", "").strip() == row["answer"]
            assert row["solution"].replace(" ", "") in re.sub(r"<<.*?>>", "", raw["answer"]).replace(" ", "")
            ids.add(row["id"])
    assert not train_ids & val_ids
    assert len(train_ids | val_ids) == len(gsm8k_train_rows)
    test_ids = [r["id"] for r in read_jsonl(out / "test.jsonl")]
    assert test_ids == [f"test-{i:05d}" for i in range(1319)]


def test_comma_answers_and_annotations_stripped(prepared):
    out, _ = prepared
    rows = {r["id"]: r for s in ("train", "val") for r in read_jsonl(out / f"{s}.jsonl")}
    assert rows["train-00000"]["solution"] == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
    )
    assert rows["train-00000"]["answer"] == "72"
    assert parse_gsm8k_answer("He has 1,000 + 200 = <<1000+200=1200>>1,200.\n#### 1,200") == (
        "He has 1,000 + 200 = 1,200.",
        "1200",
    )
    assert strip_calculator_annotations("$<<12/60=0.2>>0.2 and <<2*3=6>>6") == "$0.2 and 6"


def test_split_deterministic_and_seeded(prepared, gsm8k_dir, tmp_path):
    out, manifest = prepared
    again = prepare_data({"name": "gsm8k", "dir": str(gsm8k_dir)}, tmp_path / "a", val_size=512, seed=0)
    assert again["outputs"] == manifest["outputs"]
    other = prepare_data({"name": "gsm8k", "dir": str(gsm8k_dir)}, tmp_path / "b", val_size=512, seed=1)
    assert other["outputs"]["val"]["sha256"] != manifest["outputs"]["val"]["sha256"]
    assert other["outputs"]["test"]["sha256"] == manifest["outputs"]["test"]["sha256"]


def test_limits_apply_after_split(prepared, gsm8k_dir, tmp_path):
    out, _ = prepared
    full_val = {r["id"] for r in read_jsonl(out / "val.jsonl")}
    m = prepare_data(
        {"name": "gsm8k", "dir": str(gsm8k_dir)},
        tmp_path,
        val_size=512,
        seed=0,
        limits={"train": 50, "val": 20, "test": 30},
    )
    assert m["counts"] == {"train": 50, "val": 20, "test": 30}
    train = {r["id"] for r in read_jsonl(tmp_path / "train.jsonl")}
    val = {r["id"] for r in read_jsonl(tmp_path / "val.jsonl")}
    assert val <= full_val and not train & full_val
    assert [r["id"] for r in read_jsonl(tmp_path / "test.jsonl")] == [f"test-{i:05d}" for i in range(30)]


def test_env_dir_wins(gsm8k_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DIR, str(gsm8k_dir))
    m = prepare_data(
        {"name": "gsm8k", "dir": str(tmp_path / "nowhere")},
        tmp_path / "o",
        val_size=10,
        seed=0,
        limits={"train": 5, "val": 5, "test": 5},
    )
    assert m["source"]["dir"] == str(gsm8k_dir)


def _write_source(d, train_lines, test_lines=None):
    d.mkdir(parents=True, exist_ok=True)
    good = json.dumps({"question": "What is 1+1?", "answer": "1+1 = <<1+1=2>>2\n#### 2"})
    (d / "train.jsonl").write_text("\n".join(train_lines) + "\n")
    (d / "test.jsonl").write_text("\n".join(test_lines or [good]) + "\n")
    return good


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"question": "q"}), "missing key 'answer'"),
        (json.dumps({"question": "q", "answer": "no final line"}), "no '#### N' line"),
        (json.dumps({"question": "q", "answer": "x\n#### seven"}), "not a number"),
        (json.dumps(["q", "a"]), "expected a JSON object"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, bad, message):
    good = json.dumps({"question": "What is 1+1?", "answer": "1+1 = <<1+1=2>>2\n#### 2"})
    d = tmp_path / "src"
    _write_source(d, [good, "", good, bad, good])  # blank line 2 is skipped but counted
    with pytest.raises(DataError, match=re.escape(f"{d / 'train.jsonl'}:4: ") + ".*" + re.escape(message)):
        prepare_data(
            {"name": "gsm8k", "dir": str(d)}, tmp_path / "out", val_size=1, seed=0, limits={"train": 1}
        )
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_val_size_and_limits(tmp_path):
    d = tmp_path / "src"
    good = _write_source(d, [json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) for i in range(3)])
    assert good
    with pytest.raises(MathptError, match="val_size=3"):
        prepare_data({"name": "gsm8k", "dir": str(d)}, tmp_path / "o", val_size=3)
    with pytest.raises(MathptError, match="unknown data limit"):
        prepare_data({"name": "gsm8k", "dir": str(d)}, tmp_path / "o", val_size=1, limits={"tain": 2})
    with pytest.raises(MathptError, match="unknown data source"):
        prepare_data({"name": "math"}, tmp_path / "o")
    with pytest.raises(MathptError, match=r"unknown key\(s\) \['dri'\]"):
        prepare_data({"name": "gsm8k", "dri": str(d)}, tmp_path / "o")


def test_missing_files_in_an_existing_dir_fail_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train.jsonl: file not found"):
        prepare_data({"name": "gsm8k", "dir": str(tmp_path / "empty")}, tmp_path / "o")


def test_local_source_without_a_dir_says_what_to_set(tmp_path):
    with pytest.raises(
        DataError, match=f"'local'.*data.local_dir={tmp_path / 'nowhere'}.*does not exist.*{ENV_DIR}"
    ):
        prepare_data({"name": "gsm8k", "origin": "local", "dir": str(tmp_path / "nowhere")}, tmp_path / "o")
    with pytest.raises(DataError, match="nothing"):
        prepare_data({"name": "gsm8k", "origin": "local", "dir": None}, tmp_path / "o")


def test_auto_env_dir_that_does_not_exist_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "typo"))
    with pytest.raises(DataError, match=f"{ENV_DIR}={tmp_path / 'typo'}.*does not exist"):
        prepare_data({"name": "gsm8k", "origin": "auto", "dir": None}, tmp_path / "o")


def test_auto_uses_the_local_dir_when_it_exists(tmp_path):
    d = tmp_path / "src"
    _write_source(d, [json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) for i in range(5)])
    m = prepare_data({"name": "gsm8k", "origin": "auto", "dir": str(d)}, tmp_path / "o", val_size=1)
    assert (m["source"]["requested"], m["source"]["origin"], m["source"]["dir"]) == ("auto", "local", str(d))
    assert m["source"]["inputs"]["train"]["sha256"] == sha256_file(d / "train.jsonl")


def _fake_hub(monkeypatch, n_train=6, n_test=3):
    """datasets.load_dataset replaced by an in-memory GSM8K; the reachability probe passes."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants as c

    import mathpt.data

    calls = []

    def load_dataset(path, name=None, **kw):
        calls.append((path, name))
        rows = {
            s: [
                {"question": f"{s} q{i}?", "answer": f"{i}+1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}
                for i in range(n)
            ]
            for s, n in (("train", n_train), ("test", n_test))
        }
        return datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in rows.items()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(mathpt.data, "_probe_hub", lambda endpoint: None)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    return calls


@pytest.mark.parametrize("origin", ["auto", "hub"])
def test_hub_path_loads_openai_gsm8k_main(tmp_path, monkeypatch, origin):
    """No local copy: auto (and hub) read openai/gsm8k config main through datasets.load_dataset."""
    calls = _fake_hub(monkeypatch)
    m = prepare_data(
        {"name": "gsm8k", "origin": origin, "dir": str(tmp_path / "nowhere")},
        tmp_path / "o",
        val_size=2,
        seed=0,
    )
    assert calls == [("openai/gsm8k", "main")]
    src = m["source"]
    assert (src["requested"], src["origin"], src["hub_id"], src["hub_config"]) == (
        origin,
        "hub",
        "openai/gsm8k",
        "main",
    )
    assert m["counts"] == {"train": 4, "val": 2, "test": 3}
    test = read_jsonl(tmp_path / "o" / "test.jsonl")
    assert [r["answer"] for r in test] == ["1", "2", "3"] and test[1]["solution"] == "1+1 = 2"
    # The manifest's checksum is of the rows themselves: a changed row changes it.
    rows = "".join(
        json.dumps({"question": f"train q{i}?", "answer": f"{i}+1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"})
        + "\n"
        for i in range(6)
    )
    import hashlib

    assert src["inputs"]["train"]["sha256_rows"] == hashlib.sha256(rows.encode()).hexdigest()


def test_hub_offline_fails_fast(tmp_path, monkeypatch):
    """No local copy and an unreachable hub: one quick error that names both ways out."""
    import time

    pytest.importorskip("datasets")
    import huggingface_hub.constants as c

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(c, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    t0 = time.monotonic()
    with pytest.raises(MathptError) as e:
        prepare_data({"name": "gsm8k", "origin": "auto", "dir": str(tmp_path / "nowhere")}, tmp_path / "o")
    msg = str(e.value)
    assert time.monotonic() - t0 < 10
    assert ENV_DIR in msg and "data.local_dir" in msg and "HF hub" in msg and "does not exist" in msg


def test_arith_source(tmp_path):
    src = {"name": "arith", "n_train": 120, "n_test": 40, "max_steps": 3}
    m = prepare_data(src, tmp_path / "a", val_size=20, seed=3)
    assert m["counts"] == {"train": 100, "val": 20, "test": 40}
    assert m["source"]["name"] == "arith"
    m2 = prepare_data(src, tmp_path / "b", val_size=20, seed=3)
    assert m2["outputs"] == m["outputs"]
    rows = read_jsonl(tmp_path / "a" / "train.jsonl")
    assert all("<<" not in r["solution"] and r["answer"].isdigit() for r in rows)
    assert m["source"]["max_value"] == 200  # the default cap, recorded
    small = prepare_data({**src, "max_value": 30}, tmp_path / "c", val_size=20, seed=3)
    assert small["source"]["max_value"] == 30
    assert max(int(r["answer"]) for r in read_jsonl(tmp_path / "c" / "test.jsonl")) <= 30
