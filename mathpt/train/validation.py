"""Validation during training: val prompts sent to the inference worker, scored, logged at the
step their weights came from."""

from __future__ import annotations

import logging
import os

import numpy as np

from mathpt.engines.base import Generation, SamplingConfig
from mathpt.io import read_jsonl

log = logging.getLogger("mathpt.train")


def load_prompts(path: str | os.PathLike) -> list[dict]:
    return read_jsonl(path, required_keys=("id", "prompt", "answer"))


def val_params(max_new_tokens: int, stop: list[str]) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=0.0, n=1, stop=tuple(stop), logprobs=False
    )


def score(generations: list[Generation], answers: list[str], reward_fn) -> dict:
    """Mean reward components and response-length statistics of a list of generations."""
    rewards = [reward_fn(g.text, a) for g, a in zip(generations, answers, strict=True)]
    lengths = [len(g.token_ids) for g in generations]
    return {
        "reward": float(np.mean([r["reward"] for r in rewards])),
        "format_reward": float(np.mean([r["format_reward"] for r in rewards])),
        "answer_reward": float(np.mean([r["answer_reward"] for r in rewards])),
        "response_length_mean": float(np.mean(lengths)),
        "response_length_max": int(max(lengths)),
        "truncated_fraction": float(np.mean([g.truncated for g in generations])),
    }


def eval_metrics(result, answers: list[str], reward_fn) -> dict:
    """Validation metrics of a finished eval job, keyed for logging at the step it was taken at."""
    m = score(result.generations, answers, reward_fn)
    return {
        "accuracy": m["answer_reward"],
        "format_rate": m["format_reward"],
        "reward": m["reward"],
        "response_length_mean": m["response_length_mean"],
        "truncated_fraction": m["truncated_fraction"],
        "weight_version": result.weight_version,
        "generation_s": result.elapsed_s,
    }


class EvalTracker:
    """Validation jobs in flight: submitted with the weights of a step, drained without blocking,
    logged at the step their weights came from; a failed job is reported, never dropped.

    The worker runs an eval on the weights it was asked for when they are still current; when newer
    weights arrived first, the eval runs on those and is logged at their step (weight versions are
    training steps), and a second eval of weights already evaluated is not logged twice.
    """

    def __init__(self, client, val_rows: list[dict], reward_fn, params: SamplingConfig, logger):
        self.client, self.reward_fn, self.params, self.logger = client, reward_fn, params, logger
        self.prompts = [r["prompt"] for r in val_rows]
        self.answers = [r["answer"] for r in val_rows]
        self.pending: set = set()
        self.failures = 0
        self.logged_versions: set[int] = set()

    def submit(self, model, step: int) -> float:
        """Hand the current weights to the worker as version ``step`` and queue a val eval on them."""
        # the worker starts from the init checkpoint, which is version 0
        handoff_s = self.client.push_weights(model, version=step) if step > 0 else 0.0
        self.request(step)
        return handoff_s

    def request(self, step: int) -> None:
        """Queue a val eval of the weights last handed to the worker (those of ``step``)."""
        self.pending.add(self.client.submit("eval", self.prompts, self.params, step=step))

    def handle(self, results) -> None:
        """Log finished eval jobs (``drain`` and ``finish`` pass eval results only)."""
        for r in results:
            if r.kind != "eval":
                raise ValueError(
                    f"EvalTracker got a {r.kind!r} result (job {r.job_id}); it handles eval jobs only"
                )
            self.pending.discard(r.job_id)
            if r.error:
                self.failures += 1
                log.error("validation job for step %d failed: %s", r.step, r.error)
                self.logger.log_eval({"failed": 1.0}, step=r.step)
                continue
            if r.weight_version in self.logged_versions:
                log.info(
                    "validation asked at step %d ran on weights v%d, already evaluated",
                    r.step,
                    r.weight_version,
                )
                continue
            self.logged_versions.add(r.weight_version)
            m = eval_metrics(r, self.answers, self.reward_fn)
            log.info(
                "validation of the weights of step %d (asked at step %d): accuracy %.4f",
                r.weight_version,
                r.step,
                m["accuracy"],
            )
            self.logger.log_eval(m, step=r.weight_version)

    def drain(self) -> None:
        self.handle(self.client.poll(kind="eval"))  # rollouts stay with whoever waits for them

    def finish(self) -> None:
        for job_id in sorted(self.pending):
            self.handle([self.client.wait(job_id)])
