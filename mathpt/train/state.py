"""Resumable training state (kept outside Snakemake's declared outputs) and the final checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from mathpt.io import atomic_dir, atomic_write_json
from mathpt.models import save_model
from mathpt.provenance import write_provenance

log = logging.getLogger("mathpt.train")


def save_state(
    state_dir: str | os.PathLike,
    model,
    optimizer,
    scheduler,
    step: int,
    extra: dict | None = None,
    behaviour: dict | None = None,
) -> None:
    """Save everything needed to resume after ``step`` optimizer steps, atomically.

    ``behaviour``: the state dict of the weights that generate the next batch when they are not the
    model's (PG with staleness 1), so a resume generates it with the same weights."""
    with atomic_dir(state_dir) as tmp:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "torch_rng": torch.get_rng_state(),
                "behaviour": behaviour,
            },
            tmp / "state.pt",
        )
        atomic_write_json(tmp / "state.json", {"step": step, **(extra or {})})
    log.info("saved resumable state at step %d to %s", step, state_dir)


def load_state(state_dir: str | os.PathLike, model, optimizer, scheduler) -> dict | None:
    """Restore a previous run's state if ``state_dir`` holds one; returns its json (with ``step``),
    plus ``behaviour`` (a state dict or None) as ``save_state`` got it."""
    state_dir = Path(state_dir)
    if not (state_dir / "state.json").exists():
        return None
    meta = json.loads((state_dir / "state.json").read_text())
    blob = torch.load(state_dir / "state.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob["scheduler"] is not None:
        scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    meta["behaviour"] = blob.get("behaviour")
    log.info("resuming from %s at step %d", state_dir, meta["step"])
    return meta


def clear_state(state_dir: str | os.PathLike) -> None:
    shutil.rmtree(state_dir, ignore_errors=True)


def save_final_checkpoint(model, tokenizer, out_dir: str | os.PathLike, cfg: dict, inputs: list) -> None:
    """Write the HF-format checkpoint (config, safetensors, tokenizer) + provenance atomically."""
    with atomic_dir(out_dir) as tmp:
        save_model(model, tokenizer, tmp)
        write_provenance(tmp / "provenance.json", cfg, inputs)
