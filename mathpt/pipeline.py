"""Glue for the thin Snakemake scripts: parse the rule's config slice, log to the rule's log file,
claim GPUs, and turn user-facing errors into one clear message instead of a traceback."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any

from mathpt.io import MathptError

log = logging.getLogger("mathpt")


def setup_logging(log_path: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)


def run_script(smk: Any, main: Callable[[Any, dict], None], gpus: int = 0) -> None:
    """Run ``main(snakemake, cfg)`` for a rule; ``cfg`` is the rule's config slice from ``params.cfg``."""
    from mathpt.gpus import claim_gpus

    log_path = str(smk.log[0]) if len(smk.log) else None
    setup_logging(log_path)
    cfg = json.loads(smk.params.cfg) if hasattr(smk.params, "cfg") else {}
    try:
        with claim_gpus(gpus):
            main(smk, cfg)
    except MathptError as e:
        log.error("%s", e)
        print(f"\nmathpt error in rule {smk.rule}: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception:
        log.error("unexpected failure in rule %s:\n%s", smk.rule, traceback.format_exc())
        raise
