"""EvalTracker: validation results are logged at the weights that produced them, once each."""

from __future__ import annotations

import pytest

from mathpt.engines.base import Generation, SamplingConfig
from mathpt.rewards import get_reward_fn
from mathpt.runtime.worker import JobResult
from mathpt.train.validation import EvalTracker


class FakeLogger:
    def __init__(self):
        self.evals: list[tuple[int, dict]] = []

    def log_eval(self, metrics, step):
        self.evals.append((step, dict(metrics)))


def _result(job_id: int, step: int, version: int, texts: list[str], error: str | None = None) -> JobResult:
    gens = [Generation(i, 0, t, [1, 2], None, "stop", version) for i, t in enumerate(texts)]
    return JobResult(job_id, "eval", step, version, generations=[] if error else gens, error=error)


def test_eval_logged_at_the_weights_it_ran_on_and_only_once():
    rows = [{"prompt": "p0", "answer": "3"}, {"prompt": "p1", "answer": "5"}]
    logger = FakeLogger()
    tracker = EvalTracker(
        client=None,
        val_rows=rows,
        reward_fn=get_reward_fn("qwen_boxed"),
        params=SamplingConfig(max_new_tokens=8, temperature=0.0),
        logger=logger,
    )
    right, wrong = "so \\boxed{3}", "so \\boxed{4}"
    tracker.pending = {1, 2, 3, 4, 5}
    tracker.handle(
        [
            _result(1, step=0, version=0, texts=[wrong, wrong]),
            _result(2, step=20, version=40, texts=[right, wrong]),  # newer weights arrived first: ran on v40
            _result(
                3, step=40, version=40, texts=[right, "so \\boxed{5}"]
            ),  # the same weights again: not logged
            _result(4, step=60, version=60, texts=[], error="boom"),
        ]
    )
    assert [(s, m.get("accuracy"), m.get("failed")) for s, m in logger.evals] == [
        (0, 0.0, None),
        (40, 0.5, None),
        (60, None, 1.0),
    ]
    assert logger.evals[1][1]["weight_version"] == 40
    assert tracker.pending == {5} and tracker.failures == 1
    with pytest.raises(ValueError, match="'rollout' result"):  # rollouts belong to whoever waits for them
        tracker.handle([JobResult(9, "rollout", 61, 60)])
    assert len(logger.evals) == 3
