"""The final eval's generation budget may not be shorter than the policy-gradient rollouts' (issue 14 item 7)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from mathpt.config import ConfigError, validate_config

REPO = Path(__file__).resolve().parents[2]


def _cfg() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_eval_budget_below_pg_budget_is_refused_naming_both_keys():
    cfg = _cfg()
    cfg["train"]["pg"]["max_new_tokens"] = 256
    cfg["eval"]["gsm8k"]["max_new_tokens"] = 128
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    msg = str(e.value)
    assert "eval.gsm8k.max_new_tokens" in msg and "train.pg.max_new_tokens" in msg
    assert "128" in msg and "256" in msg


def test_equal_budgets_pass_and_sft_only_is_not_checked():
    cfg = _cfg()
    budget = cfg["eval"]["gsm8k"]["max_new_tokens"]
    cfg["train"]["pg"]["max_new_tokens"] = budget
    validate_config(copy.deepcopy(cfg))  # equal is fine
    cfg["train"]["pg"]["max_new_tokens"] = budget + 1
    with pytest.raises(ConfigError, match="eval.gsm8k.max_new_tokens"):
        validate_config(copy.deepcopy(cfg))
    cfg["train"]["algorithms"] = ["sft"]  # no PG variant is trained: its budget does not matter
    validate_config(cfg)


@pytest.mark.parametrize("name", ["config.yaml", "arith.yaml", "gsm8k-cpu.yaml", "qwen2.5-math-1.5b.yaml"])
def test_shipped_configs_evaluate_with_at_least_the_pg_budget(name):
    cfg = yaml.safe_load((REPO / "config" / name).read_text())
    validate_config(cfg)
    assert cfg["eval"]["gsm8k"]["max_new_tokens"] >= cfg["train"]["pg"]["max_new_tokens"]


# Issue 27 item 5: the validation curves get the same rule as the final eval.


def test_val_budget_below_pg_budget_is_refused_naming_both_keys():
    cfg = _cfg()
    cfg["train"]["pg"]["max_new_tokens"] = 64
    cfg["train"]["pg"]["val_max_new_tokens"] = 48
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    msg = str(e.value)
    assert "train.pg.val_max_new_tokens" in msg and "train.pg.max_new_tokens" in msg
    assert "48" in msg and "64" in msg and "raise train.pg.val_max_new_tokens" in msg


def test_equal_val_budget_passes_and_sft_only_is_not_checked():
    cfg = _cfg()
    cfg["train"]["pg"]["val_max_new_tokens"] = cfg["train"]["pg"]["max_new_tokens"]
    validate_config(copy.deepcopy(cfg))
    cfg["train"]["pg"]["val_max_new_tokens"] = cfg["train"]["pg"]["max_new_tokens"] - 1
    with pytest.raises(ConfigError, match="train.pg.val_max_new_tokens"):
        validate_config(copy.deepcopy(cfg))
    cfg["train"]["algorithms"] = ["sft"]
    validate_config(cfg)


SHIPPED = sorted((REPO / "config").glob("*.yaml")) + sorted((REPO / "tests" / "assets").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.name != "schema.yaml"], ids=lambda p: p.name)
def test_shipped_configs_validate_with_at_least_the_pg_budget(path):
    from mathpt.config import PG_ALGOS, pg_config

    cfg = yaml.safe_load(path.read_text())
    validate_config(cfg)
    for algo in (a for a in PG_ALGOS if a in cfg["train"]["algorithms"]):
        merged = pg_config(cfg, algo)
        assert merged["val_max_new_tokens"] >= merged["max_new_tokens"], algo
