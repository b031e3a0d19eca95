"""Every wait of the trainer on its inference worker is bounded and names what it waited for
(issue 16): job results, hand-off acknowledgements, the hand-off lock, the NCCL broadcast."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from mathpt.runtime.handoff import Layout, Mailbox, NcclSender, WorkerError


class _NeverDone:
    def is_completed(self) -> bool:
        return False

    def wait(self) -> None:  # pragma: no cover - never reached
        raise AssertionError("wait() on a broadcast that never completes")


class _StuckGroup:
    """A process group whose broadcast never completes (the peer never joins it)."""

    def broadcast(self, tensors, opts):
        return _NeverDone()


def _sender(wait_ack, timeout_s: float) -> NcclSender:
    named = [("w", torch.zeros(3, 2)), ("b", torch.zeros(2))]
    s = NcclSender(
        Layout.of(named, torch.float32),
        torch.device("cpu"),
        None,
        lambda: None,
        lambda msg: None,
        wait_ack,
        timeout_s=timeout_s,
    )
    s.pg = _StuckGroup()
    return s, named


def test_nccl_sender_reads_the_workers_error_reply():
    """The worker's side of the broadcast failed and it said so: the sender stops at once with that error."""
    polls = []

    def wait_ack(key, timeout_s=None):
        polls.append((key, timeout_s))
        raise WorkerError(f"weight hand-off {key} failed in the inference worker:\nRuntimeError: recv failed")

    sender, named = _sender(wait_ack, timeout_s=60)
    t0 = time.monotonic()
    with pytest.raises(
        WorkerError, match=r"\('stage', 3\) failed in the inference worker:\nRuntimeError: recv failed"
    ):
        sender.push(named, 3)
    assert time.monotonic() - t0 < 5
    assert polls and polls[0] == (("stage", 3), 0.0)  # polled, never blocked


def test_nccl_sender_gives_up_on_a_silent_peer():
    sender, named = _sender(lambda key, timeout_s=None: False, timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(
        WorkerError, match=r"version 4: the broadcast to the inference worker did not complete within"
    ):
        sender.push(named, 4)
    assert 0.5 <= time.monotonic() - t0 < 5


def test_handoff_lock_held_by_a_stuck_worker_ends_the_wait():
    mailbox = Mailbox(mp.get_context("spawn"))
    assert mailbox.lock.acquire()  # the "worker" holds it and never lets go
    checks = []
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="held the weight hand-off lock for more than"):
        mailbox.acquire(lambda: checks.append(1), timeout_s=1.0)
    assert 1.0 <= time.monotonic() - t0 < 5 and checks  # the worker's health was checked while waiting


@pytest.mark.slow
def test_wait_for_a_job_is_bounded_and_names_the_job(tiny_model_dir):
    """A live worker whose job does not finish in time: JobTimeout naming the job and the config key."""
    from mathpt.engines.base import SamplingConfig
    from mathpt.runtime.client import InferenceClient, JobTimeout

    with InferenceClient("hf", tiny_model_dir, device="cpu", job_timeout_s=0.2) as client:
        job = client.submit("rollout", ["What is 2 + 3?"] * 4, SamplingConfig(max_new_tokens=64), step=7)
        t0 = time.monotonic()
        with pytest.raises(
            JobTimeout, match=r"rollout job 0 did not finish within 0.2 s \(runtime.job_timeout_s\)"
        ):
            client.wait(job)
        assert time.monotonic() - t0 < 5
        assert client.wait(job, timeout=600).ok  # an explicit, longer bound still works
