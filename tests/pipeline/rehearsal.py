"""Rehearsals of the shipped configs: each one end to end on the CPU, with its own keys.

A rehearsal runs ``snakemake --configfile config/<name>.yaml rehearsal.yaml``: the shipped file, then
an override file that changes only

- sizes: problem counts, a tiny model built in place of a hub model (and smaller tiny shapes), steps,
  batch sizes, token budgets, the number of training seeds, bootstrap resamples;
- where things run: the CPU layout and its memory fraction, one eval shard;
- what cannot run offline: hub-only lm-eval tasks become the local ones, and the API teacher's
  ``base_url`` points at the project's fake OpenAI-compatible server (tests/teachers/fake_openai_server.py).

Every other key the shipped file sets (teacher kind and sampling, prompt style, algorithms, losses,
off-policy correction, staleness, k-shot, eval backend, ...) runs as shipped. ``ALLOWED`` lists the
key paths an override may touch; a test checks every override against it.
"""

from __future__ import annotations

import copy
from typing import Any

ALLOWED = (
    "data.limits",
    "data.val_size",
    "data.arith.n_train",
    "data.arith.n_test",
    "model",
    "tokenize.max_seq_len",
    "teacher.base_url",
    "teacher.max_tokens",
    "runtime.layout",
    "runtime.gpu_memory_utilization",
    "runtime.handoff",
    "runtime.max_model_len",
    "train.seeds",
    "train.sft.epochs",
    "train.sft.microbatches_per_step",
    "train.sft.microbatch_tokens",
    "train.sft.warmup_steps",
    "train.sft.eval_every",
    "train.sft.checkpoint_every",
    "train.sft.val_max_new_tokens",
    "train.pg.n_steps",
    "train.pg.rollout_batch_size",
    "train.pg.minibatch_size",
    "train.pg.microbatch_size",
    "train.pg.microbatch_tokens",
    "train.pg.max_new_tokens",
    "train.pg.val_max_new_tokens",
    "train.pg.warmup_steps",
    "train.pg.eval_every",
    "train.pg.checkpoint_every",
    "eval.gsm8k.max_new_tokens",
    "eval.gsm8k.num_shards",
    "eval.lm_eval.tasks",
    "eval.lm_eval.limit",
    "eval.lm_eval.max_gen_toks",
    "stats.n_resamples",
)
LOCAL_LM_TASKS = ["gsm8k_local", "wikitext_local"]
TINY = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "seed": 0,
    "tokenizer_rows": 300,
}
NEW_TOKENS = 24


def rehearsal_overrides(cfg: dict, teacher_url: str | None, max_seeds: int = 1) -> dict:
    """The override file for shipped config ``cfg`` (already validated, defaults filled)."""
    train, pg = cfg["train"], cfg["train"]["pg"]
    group = pg["group_size"]
    rollouts = 2 * group
    over: dict[str, Any] = {
        "data": {
            "limits": {"train": 96, "val": 8, "test": 16},
            "val_size": 8,
            "arith": {"n_train": 200, "n_test": 16},
        },
        "model": {"kind": "tiny", "path": None, "tiny": TINY},
        "tokenize": {"max_seq_len": 384},
        "runtime": {
            "layout": "cpu",
            "gpu_memory_utilization": 0.05,
            "handoff": "auto",
            "max_model_len": 4096,
        },
        "train": {
            "seeds": train["seeds"][:max_seeds],
            "sft": {
                "epochs": 1,
                "microbatches_per_step": 1,
                "microbatch_tokens": 4096,
                "warmup_steps": 1,
                "eval_every": 4,
                "checkpoint_every": 4,
                "val_max_new_tokens": NEW_TOKENS,
            },
            "pg": {
                "n_steps": 2,
                "rollout_batch_size": rollouts,
                "minibatch_size": rollouts // 2,
                "microbatch_size": rollouts // 2,
                "microbatch_tokens": 4096,
                "max_new_tokens": NEW_TOKENS,
                "val_max_new_tokens": NEW_TOKENS,
                "warmup_steps": 1,
                "eval_every": 2,
                "checkpoint_every": 1,
            },
        },
        "eval": {
            "gsm8k": {"max_new_tokens": NEW_TOKENS, "num_shards": 1},
            "lm_eval": {
                "tasks": [t for t in cfg["eval"]["lm_eval"]["tasks"] if t.endswith("_local")]
                or LOCAL_LM_TASKS,
                "limit": 4,
                "max_gen_toks": NEW_TOKENS,
            },
        },
        "stats": {"n_resamples": 1000},
    }
    if cfg["teacher"]["kind"] == "api":
        assert teacher_url, "an API teacher needs the fake server's URL"
        over["teacher"] = {"base_url": teacher_url, "max_tokens": 256}
    return over


def key_paths(d: dict, prefix: str = "") -> list[str]:
    """Every leaf key path of a nested dict ("a.b.c"); a dict value under an allowed prefix is a leaf."""
    out = []
    for k, v in d.items():
        p = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and p not in ALLOWED and v:
            out += key_paths(v, p)
        else:
            out.append(p)
    return out


def allowed(path: str) -> bool:
    return any(path == a or path.startswith(a + ".") for a in ALLOWED)


def merged(cfg: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``cfg`` the way Snakemake merges config files (nested dicts)."""
    out = copy.deepcopy(cfg)
    for k, v in over.items():
        out[k] = (
            merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
        )
    return out
