"""The ``hf`` engine: transformers ``generate``, the fallback and the reference for ``vllm``.

Batched with left padding; greedy when ``temperature == 0``. Log-probs are the *raw* model
log-probs of the sampled tokens (log-softmax of the unwarped logits, i.e. at temperature 1),
which is what vLLM returns by default (``logprobs_mode="raw_logprobs"``), so the two engines'
numbers mean the same thing. Stop strings that are a single special token (``<|im_end|>``) become
stop token ids, as in vLLM; other stop strings are kept at the end of the text.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence

import torch

from mathpt import timing
from mathpt.engines.base import Generation, Prompt, SamplingConfig, cut_at_stop, split_stops

# vLLM engine settings that mean nothing here; accepted so one runtime config serves both engines
VLLM_ONLY_KWARGS = frozenset(
    {
        "gpu_memory_utilization",
        "enforce_eager",
        "kv_cache_memory_bytes",
        "seed",
        "weight_load",
        "load_format",
        "skip_tokenizer_init",
        "enable_prefix_caching",
        "enable_sleep_mode",
    }
)


class _StopOnText:
    """Stop a row once its *generated* text contains a stop string (transformers' own
    ``stop_strings`` also matches across the prompt boundary; vLLM looks at the output only)."""

    def __init__(self, tokenizer, stops: list[str], prompt_width: int):
        self.tokenizer, self.stops, self.width = tokenizer, stops, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


class _PerRowSampler:
    """Logits processor that draws each row's next token from the row's own ``torch.Generator``.

    Runs after transformers' temperature / top-p warpers and returns scores that are -inf except at
    the drawn token, so ``generate``'s own multinomial can only pick it. A row's draws then depend
    on its seed alone, not on which rows share its batch (vLLM's per-request ``seed`` does the same).
    """

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.gens = [torch.Generator(device=device).manual_seed(int(s) % 2**63) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float(), dim=-1)
        picks = torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(self.gens)])
        out = torch.full_like(scores, -torch.inf)
        return out.scatter_(1, picks.unsqueeze(1), 0.0)


class HFEngine:
    """transformers ``generate`` behind the engine interface (see ``base.InferenceEngine``)."""

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        batch_size: int = 64,
        max_model_len: int | None = None,
        *,
        model=None,
        tokenizer=None,
        **vllm_only,
    ) -> None:
        from mathpt.models import load_model, load_tokenizer

        unknown = set(vllm_only) - VLLM_ONLY_KWARGS
        if unknown:  # one runtime config serves both engines; anything else is a typo
            raise TypeError(f"HFEngine got unexpected keyword arguments {sorted(unknown)}")
        self.max_model_len = max_model_len

        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path)
        self.tokenizer.padding_side = "left"
        self.model = model if model is not None else load_model(model_path, dtype=dtype, device=self.device)
        self.model.eval()
        self.weight_version = 0

    @classmethod
    def from_model(cls, model, tokenizer, batch_size: int = 64) -> HFEngine:
        """Wrap an in-memory model (e.g. the trainer's) without copying it."""
        device = next(model.parameters()).device
        return cls(device=str(device), batch_size=batch_size, model=model, tokenizer=tokenizer)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        return [
            list(p) if not isinstance(p, str) else self.tokenizer(p, add_special_tokens=True)["input_ids"]
            for p in prompts
        ]

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], params: SamplingConfig) -> list[Generation]:
        """Generations ordered by (prompt_index, sample_index); ``params.n`` per prompt."""
        from transformers import GenerationConfig

        encoded = self._encode(prompts)
        text_stops, stop_ids = split_stops(params.stop, self.tokenizer)
        eos = self.tokenizer.eos_token_id
        stop_set = {eos, *stop_ids}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        greedy = params.temperature <= 0
        gen_cfg = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy else 0,  # vLLM's default: no top-k (transformers would default to 50)
            repetition_penalty=1.0,
            num_beams=1,
            eos_token_id=sorted(stop_set),
            pad_token_id=pad,
            output_logits=params.logprobs,
            return_dict_in_generate=True,
        )
        # one row per (prompt, sample), in output order
        rows = [(i, s) for i in range(len(encoded)) for s in range(params.n)]
        seeds = params.row_seeds(len(encoded)) if not greedy else None
        out: list[Generation] = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=params.seed is not None):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                row_seeds = [seeds[i * params.n + j] for i, j in chunk] if seeds is not None else None
                out += self._generate_batch(
                    chunk, encoded, gen_cfg, pad, stop_set, text_stops, params, row_seeds
                )
        return out

    def _generate_batch(
        self, rows, encoded, gen_cfg, pad, stop_set, text_stops, params, row_seeds=None
    ) -> list[Generation]:
        seqs = [encoded[i] for i, _ in rows]
        width = max(len(s) for s in seqs)
        max_new = params.max_new_tokens
        if self.max_model_len is not None:  # like vLLM: prompt + completion fit in max_model_len
            longest = max(len(s) for s in seqs)
            if longest >= self.max_model_len:
                raise ValueError(
                    f"prompt of {longest} tokens does not fit max_model_len={self.max_model_len}"
                )
            max_new = min(max_new, self.max_model_len - longest)
        if max_new != gen_cfg.max_new_tokens:
            gen_cfg = copy.deepcopy(gen_cfg)
            gen_cfg.max_new_tokens = max_new
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s) :] = 1
        from transformers import LogitsProcessorList, StoppingCriteriaList

        stopping = StoppingCriteriaList(
            [_StopOnText(self.tokenizer, text_stops, width)] if text_stops else []
        )
        sampler = LogitsProcessorList(
            [_PerRowSampler(row_seeds, self.device)] if row_seeds is not None else []
        )
        res = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            generation_config=gen_cfg,
            stopping_criteria=stopping,
            logits_processor=sampler,
        )
        new = res.sequences[:, width:].cpu()
        token_lp = None
        if params.logprobs and new.shape[1] > 0:
            # raw log-probs of the chosen tokens, one step at a time to keep memory at (B, V)
            token_lp = torch.stack(
                [
                    torch.log_softmax(step_logits.float(), dim=-1)
                    .gather(1, new[:, t : t + 1].to(step_logits.device))
                    .squeeze(1)
                    .cpu()
                    for t, step_logits in enumerate(res.logits)
                ],
                dim=1,
            )
        gens = []
        for r, (pi, si) in enumerate(rows):
            toks = new[r].tolist()
            end = next((t + 1 for t, tok in enumerate(toks) if tok in stop_set), None)
            toks = toks if end is None else toks[:end]
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            text, hit_text_stop = cut_at_stop(text, text_stops)
            if hit_text_stop:  # drop what came after the stop (padding of a finished row)
                toks = toks[: self._first_prefix_with_stop(toks, text_stops)]
            finish = "stop" if end is not None or hit_text_stop else "length"
            gens.append(
                Generation(
                    prompt_index=pi,
                    sample_index=si,
                    text=text,
                    token_ids=toks,
                    logprobs=token_lp[r, : len(toks)].tolist() if token_lp is not None else None,
                    finish_reason=finish,
                    weight_version=self.weight_version,
                    prompt_token_ids=list(seqs[r]),
                )
            )
        timing.mark("first_output")
        return gens

    def _first_prefix_with_stop(self, toks: list[int], stops: list[str]) -> int:
        """Smallest k such that the first k tokens' text contains a stop string (binary search)."""
        lo, hi = 1, len(toks)
        while lo < hi:
            mid = (lo + hi) // 2
            if cut_at_stop(self.tokenizer.decode(toks[:mid], skip_special_tokens=True), stops)[1]:
                hi = mid
            else:
                lo = mid + 1
        return lo

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy tensors (HF parameter names) into the model, then set ``weight_version``."""
        params = self.model.state_dict(keep_vars=True)  # includes tied aliases (lm_head.weight)
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"load_weights: unknown parameter {name!r}")
            params[name].data.copy_(tensor)
        self.weight_version = version

    def sleep(self) -> None:
        """Free the GPU while the trainer updates (vLLM's level-1 sleep, done by hand): the weights
        go to CPU RAM; a no-op on cpu. ``wake_up`` brings them back."""
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)

    def close(self) -> None:
        self.model = None
