"""The dual-process runtime: an inference worker beside the trainer, with in-memory weight hand-off.

- ``client``: ``InferenceClient`` (trainer side: jobs, results, heartbeat, cleanup) and ``RolloutPipeline``.
- ``worker``: the worker process (engine, job loop, applies weights between generations).
- ``handoff``: versioned weight hand-off (shared memory, CUDA IPC, NCCL/gloo broadcast, /dev/shm files).
"""

from mathpt.runtime.client import InferenceClient, JobTimeout, RolloutPipeline, WorkerError
from mathpt.runtime.worker import JobResult

__all__ = ["InferenceClient", "JobResult", "JobTimeout", "RolloutPipeline", "WorkerError"]
