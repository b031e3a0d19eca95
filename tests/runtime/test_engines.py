"""The ``hf`` engine against independent references (the ``vllm`` engine is tested through the
runtime worker in test_runtime.py, since vLLM must live in its own process)."""

from __future__ import annotations

import pytest
import torch

from mathpt.engines import SamplingConfig
from mathpt.engines.base import cut_at_stop, split_stops
from mathpt.engines.hf_engine import HFEngine

PROMPTS = ["Natalia sold clips to 48 of her friends", "How many apples", "x"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> HFEngine:
    return HFEngine(tiny_model_dir, batch_size=2)  # batch 2 < 3 prompts: exercises batching + left padding


def _reference_greedy(model, prompt_ids: list[int], n_new: int) -> tuple[list[int], list[float]]:
    """Greedy decoding by full forward passes in float64, one prompt at a time (no cache, no padding)."""
    ids = list(prompt_ids)
    toks, lps = [], []
    m64 = model.double()
    try:
        for _ in range(n_new):
            logits = m64(torch.tensor([ids])).logits[0, -1]
            lp = torch.log_softmax(logits, -1)
            t = int(lp.argmax())
            toks.append(t)
            lps.append(float(lp[t].detach()))
            ids.append(t)
    finally:
        model.float()
    return toks, lps


def test_greedy_matches_float64_reference(engine):
    params = SamplingConfig(max_new_tokens=8, temperature=0.0)
    gens = engine.generate(PROMPTS, params)
    assert [(g.prompt_index, g.sample_index) for g in gens] == [(0, 0), (1, 0), (2, 0)]
    for g, p in zip(gens, PROMPTS, strict=True):
        prompt_ids = engine.tokenizer(p)["input_ids"]
        assert g.prompt_token_ids == prompt_ids
        toks, lps = _reference_greedy(engine.model, prompt_ids, len(g.token_ids))
        assert g.token_ids == toks
        assert g.logprobs == pytest.approx(lps, abs=1e-4)
        assert g.weight_version == 0


def test_sampling_n_seed_and_raw_logprobs(engine):
    params = SamplingConfig(max_new_tokens=6, temperature=0.7, top_p=0.9, n=3, seed=123)
    a = engine.generate(PROMPTS[:2], params)
    b = engine.generate(PROMPTS[:2], params)
    assert [(g.prompt_index, g.sample_index) for g in a] == [(i, s) for i in range(2) for s in range(3)]
    assert [g.token_ids for g in a] == [g.token_ids for g in b]  # seeded
    assert len({tuple(g.token_ids) for g in a}) > 1
    # log-probs are raw (temperature 1) log-softmax of the model, whatever the sampling temperature
    g = a[0]
    ids = torch.tensor([g.prompt_token_ids + g.token_ids])
    with torch.no_grad():
        logits = engine.model.double()(ids).logits[0].float()
    engine.model.float()
    n = len(g.prompt_token_ids)
    ref = torch.log_softmax(logits.double(), -1)[n - 1 : -1].gather(1, ids[0, n:, None]).squeeze(1)
    assert g.logprobs == pytest.approx(ref.tolist(), abs=1e-4)


def test_token_id_prompts_equal_text_prompts(engine):
    params = SamplingConfig(max_new_tokens=5, temperature=0.0)
    ids = [engine.tokenizer(p)["input_ids"] for p in PROMPTS]
    assert [g.token_ids for g in engine.generate(ids, params)] == [
        g.token_ids for g in engine.generate(PROMPTS, params)
    ]


def test_stop_strings_and_special_stop_tokens(engine):
    tok = engine.tokenizer
    texts, ids = split_stops(["</answer>", "<|im_end|>"], tok)
    assert texts == ["</answer>"] and ids == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert cut_at_stop("a </answer> b </answer>", ["</answer>"]) == ("a </answer>", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    # make the model emit a chosen token: bias the output embedding towards it
    free = engine.generate(["How many"], SamplingConfig(max_new_tokens=4, temperature=0.0))[0]
    stop_piece = tok.decode(free.token_ids[:2])
    gen = engine.generate(
        ["How many"], SamplingConfig(max_new_tokens=10, temperature=0.0, stop=(stop_piece,))
    )[0]
    assert gen.finish_reason == "stop" and gen.text.endswith(stop_piece) and len(gen.token_ids) <= 2
    assert free.finish_reason == "length" and free.truncated
    # in a batch, a row that stops early is padded by generate: the padding must not leak out
    batch = engine.generate(
        ["How many", *PROMPTS], SamplingConfig(max_new_tokens=10, temperature=0.0, stop=(stop_piece,))
    )
    assert batch[0].token_ids == gen.token_ids and batch[0].text == gen.text


def test_load_weights_changes_generations_and_version(tiny_model_dir):
    eng = HFEngine(tiny_model_dir)
    params = SamplingConfig(max_new_tokens=8, temperature=0.0)
    before = eng.generate(PROMPTS, params)
    new = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in eng.model.named_parameters()}
    eng.load_weights(new.items(), version=3)
    after = eng.generate(PROMPTS, params)
    assert eng.weight_version == 3 and all(g.weight_version == 3 for g in after)
    assert [g.token_ids for g in before] != [g.token_ids for g in after]
    for n, p in eng.model.named_parameters():
        assert torch.equal(p, new[n])
    with pytest.raises(KeyError, match="nope"):
        eng.load_weights([("nope", torch.zeros(1))], version=4)


def test_vllm_settings_accepted_typos_rejected_and_max_model_len_caps(tiny_model_dir):
    eng = HFEngine(tiny_model_dir, max_model_len=12, gpu_memory_utilization=0.5, enforce_eager=True)
    prompt = list(range(5, 13))  # 8 tokens: room for 4 more
    g = eng.generate([prompt], SamplingConfig(max_new_tokens=50, temperature=0.0))[0]
    assert len(g.token_ids) <= 4 and (len(g.token_ids) == 4 or g.finish_reason == "stop")
    with pytest.raises(ValueError, match="max_model_len"):
        eng.generate([list(range(5, 20))], SamplingConfig(max_new_tokens=2, temperature=0.0))
    with pytest.raises(TypeError, match="gpu_memory_utilisation"):
        HFEngine(tiny_model_dir, gpu_memory_utilisation=0.5)
