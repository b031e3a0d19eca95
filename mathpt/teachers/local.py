"""A local-model teacher: any model on disk, through the project's inference engines (vllm or hf).

It prompts the model in the chosen style (``mathpt.prompts.format_prompt``), samples
``samples_per_prompt`` (k) answers per prompt, and returns them for grading; with ``keep: correct``
only the right ones reach SFT (rejection sampling, as in STaR / RFT). Finished batches go to the
same durable ``CompletionCache`` as the API teacher, keyed by a fingerprint of the model's files, so
a long run on a big model resumes too.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from mathpt.io import MathptError
from mathpt.teachers.cache import CompletionCache, cache_key, prompt_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalTeacherSettings:
    """The ``teacher`` config keys the local teacher reads (``kind: local``)."""

    model_path: str = ""
    engine: str = "vllm"  # vllm | hf
    engine_kwargs: dict = field(
        default_factory=dict
    )  # passed to make_engine (device, dtype, max_model_len...)
    samples_per_prompt: int = 1  # k
    max_tokens: int = 2048
    temperature: float = 0.6
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 64  # prompts per generate call (and per cache write)
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: dict) -> LocalTeacherSettings:
        known = {f.name for f in fields(cls)}
        s = cls(**{k: v for k, v in cfg.items() if k in known and v is not None})
        if not s.model_path:
            raise MathptError("config key 'teacher.model_path': required when teacher.kind is 'local'")
        if not Path(s.model_path).is_dir():
            raise MathptError(f"config key 'teacher.model_path': {s.model_path} is not a model directory")
        for name in ("samples_per_prompt", "max_tokens", "batch_size"):
            if not isinstance(getattr(s, name), int) or getattr(s, name) < 1:
                raise MathptError(
                    f"config key 'teacher.{name}': expected a positive integer, got {getattr(s, name)!r}"
                )
        return s


def model_fingerprint(model_path: str | os.PathLike) -> str:
    """sha256 over the model's config, tokenizer and weight files, so a retrained model is never served from cache."""
    h = hashlib.sha256()
    root = Path(model_path)
    files = sorted(
        p for p in root.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".model")
    )
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:16]


def run_local_teacher(
    s: LocalTeacherSettings, rows: list[dict], style: str, cache_path: str | os.PathLike
) -> tuple[list[dict], dict]:
    """k completions per row, as records ``{row_id, sample_index, content, finish_reason, usage}``.

    Records come back in row order, sample index fastest; the accounting dict counts tokens.
    """
    from tqdm.auto import tqdm

    from mathpt.engines import SamplingConfig, make_engine
    from mathpt.prompts import format_prompt, stop_strings

    params = SamplingConfig(
        max_new_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        n=s.samples_per_prompt,
        stop=tuple(stop_strings(style)),
        seed=s.seed,
        logprobs=False,
    )
    model_id = f"local:{model_fingerprint(s.model_path)}"
    hparams = {
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "seed": s.seed,
        "stop": list(params.stop),
    }
    prompts = [format_prompt(r["question"], style) for r in rows]
    keys = [
        [
            cache_key(model_id, prompt_hash([{"role": "raw", "content": p}], hparams), i)
            for i in range(s.samples_per_prompt)
        ]
        for p in prompts
    ]
    stats = {
        "calls_new": 0,
        "calls_cached": 0,
        "tokens": {"prompt_tokens": 0, "completion_tokens": 0},
        "finish_reasons": {},
        "model_fingerprint": model_id,
    }

    with CompletionCache(cache_path) as cache:
        todo = [j for j, ks in enumerate(keys) if any(k not in cache for k in ks)]
        stats["calls_cached"] = (len(rows) - len(todo)) * s.samples_per_prompt
        if todo:
            engine = make_engine(s.engine, s.model_path, **s.engine_kwargs)
            try:
                bar = tqdm(
                    total=len(todo), desc=f"local teacher ({s.engine})", unit="prompt", disable=not s.progress
                )
                for b in range(0, len(todo), s.batch_size):
                    batch = todo[b : b + s.batch_size]
                    gens = engine.generate([prompts[j] for j in batch], params)
                    for g in gens:
                        j = batch[g.prompt_index]
                        cache.put(
                            {
                                "key": keys[j][g.sample_index],
                                "model": model_id,
                                "row_id": rows[j]["id"],
                                "sample_index": g.sample_index,
                                "content": g.text,
                                "reasoning_content": None,
                                "finish_reason": g.finish_reason,
                                "usage": {
                                    "prompt_tokens": len(g.prompt_token_ids),
                                    "completion_tokens": len(g.token_ids),
                                },
                            }
                        )
                        stats["calls_new"] += 1
                    bar.update(len(batch))
                bar.close()
            finally:
                engine.close()
        records = [cache.get(k) for ks in keys for k in ks]
    if any(r is None for r in records):
        raise MathptError(
            f"local teacher: engine {s.engine!r} returned fewer than {s.samples_per_prompt} "
            "samples for some prompts"
        )

    for rec in records:
        for name, v in rec["usage"].items():
            stats["tokens"][name] = stats["tokens"].get(name, 0) + v
        stats["finish_reasons"][rec["finish_reason"]] = (
            stats["finish_reasons"].get(rec["finish_reason"], 0) + 1
        )
    return records, stats
