"""Every shipped config means exactly its own file, and runs end to end (rehearsal.py says how).

The Snakefile loads the quick start only when no ``--configfile`` is named; before, a named config was
merged over it and the quick start's keys leaked into every experiment (the reference config stopped
at ``traces`` on the arith teacher's ``unformatted_fraction``). The effective config is read from
Snakemake's own workflow object, not re-derived.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mathpt.config import validate_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "teachers"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_openai_server import TEST_KEY, FakeOpenAIServer  # noqa: E402
from rehearsal import allowed, key_paths, merged, rehearsal_overrides  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (REPO / "config").glob("*.yaml") if p.name != "schema.yaml")
WORKFLOW_PARTS = ["Snakefile", "rules", "scripts", "config", "report", "profiles", "envs"]


def effective_config(configfiles: list[Path], workdir: Path) -> tuple[dict, list[str]]:
    """The config Snakemake builds for these ``--configfile`` arguments (validated, defaults filled),
    and the config files it says it read."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        wf = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[p.resolve() for p in configfiles]),
            snakefile=REPO / "Snakefile",
            workdir=workdir,
        )
        w = wf._workflow
        return copy_json(w.config), [str(f) for f in w.configfiles]


def copy_json(d: dict) -> dict:
    return json.loads(json.dumps(d))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_a_named_config_is_that_file_plus_schema_defaults(path, tmp_path):
    own = yaml.safe_load(path.read_text())
    validate_config(own)
    got, files = effective_config([path], tmp_path)
    assert [Path(f).name for f in files] == [path.name]
    assert got == copy_json(own), "keys from another file reached the effective config"


def test_without_configfile_the_quick_start_is_the_config(tmp_path):
    shutil.copytree(REPO / "config", tmp_path / "config")  # the Snakefile's path is relative to the workdir
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        wf = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(),
            snakefile=REPO / "Snakefile",
            workdir=tmp_path,
        )
        got = copy_json(wf._workflow.config)
    quick = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    validate_config(quick)
    assert got == copy_json(quick)


def test_override_file_merges_over_the_named_config(tmp_path):
    """--configfile A B: B's keys win, A's others stay, and no third file (the quick start) is read."""
    (tmp_path / "over.yaml").write_text(yaml.safe_dump({"train": {"pg": {"n_steps": 7}}}))
    ref = REPO / "config" / "qwen2.5-math-1.5b.yaml"
    got, files = effective_config([ref, tmp_path / "over.yaml"], tmp_path)
    assert got["train"]["pg"]["n_steps"] == 7
    assert got["teacher"]["kind"] == "api" and got["teacher"].get("unformatted_fraction", 0.0) == 0.0
    assert [Path(f).name for f in files] == [ref.name, "over.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_rehearsal_overrides_only_sizes_places_and_offline_swaps(path):
    cfg = yaml.safe_load(path.read_text())
    validate_config(cfg)
    over = rehearsal_overrides(cfg, "http://127.0.0.1:1/v1")
    bad = [p for p in key_paths(over) if not allowed(p)]
    assert bad == []
    eff = merged(cfg, over)
    validate_config(eff)  # the rehearsal is itself a valid config
    for key in ("teacher", "prompt_style"):
        kept = (
            {k: v for k, v in cfg[key].items() if k not in ("base_url", "max_tokens")}
            if key == "teacher"
            else cfg[key]
        )
        got = (
            {k: v for k, v in eff[key].items() if k not in ("base_url", "max_tokens")}
            if key == "teacher"
            else eff[key]
        )
        assert got == kept
    assert eff["train"]["algorithms"] == cfg["train"]["algorithms"]


def _gold_answerer(workdir: Path):
    """Answers like DeepSeek-R1 with the gold answer of the question (read from the run's own data), so
    rejection sampling (`teacher.keep: correct`) keeps the traces."""
    gold: dict[str, str] = {}

    def answer(user: str) -> tuple[str, str]:
        if not gold:
            for line in open(workdir / "results" / "data" / "train.jsonl"):
                r = json.loads(line)
                gold[r["question"]] = r["answer"]
        ans = next((a for q, a in gold.items() if q in user), "0")
        return (f"We add the numbers step by step.\nThe final answer is $\\boxed{{{ans}}}$.", "Let me think.")

    return answer


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_rehearsal_runs_to_the_ci_table(path, tmp_path):
    for part in WORKFLOW_PARTS:
        src = REPO / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / part)
    cfg = yaml.safe_load(path.read_text())
    validate_config(cfg)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    server = None
    if cfg["teacher"]["kind"] == "api":
        server = FakeOpenAIServer(answer_fn=_gold_answerer(tmp_path))
        server.start()
        env[cfg["teacher"]["api_key_env"]] = TEST_KEY
    if cfg["data"]["source"] in ("auto", "local") and not os.environ.get("MATHPT_GSM8K_DIR"):
        pytest.skip("GSM8K configs rehearse on the local copy MATHPT_GSM8K_DIR names (CI sets it)")
    over = rehearsal_overrides(cfg, server.base_url if server else None)
    (tmp_path / "rehearsal.yaml").write_text(yaml.safe_dump(over, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "all", "--cores", "2"]
    cmd += ["--configfile", f"config/{path.name}", "rehearsal.yaml"]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=1800)
    finally:
        if server:
            server.stop()
    if proc.returncode != 0:
        logs = "\n".join(
            f"--- {p}\n{p.read_text()[-3000:]}" for p in (tmp_path / "results" / "logs").rglob("*.log")
        )
        raise AssertionError(f"{path.name} rehearsal failed:\n{proc.stderr[-6000:]}\n{logs[-20000:]}")
    table = list(csv.DictReader(open(tmp_path / "results" / "ci_table.csv")))
    assert table, "empty ci_table.csv"
    ran = {r["model_a"].split("-seed")[0] for r in table} | {r["model_b"].split("-seed")[0] for r in table}
    assert set(cfg["train"]["algorithms"]) <= ran
    if server:
        assert server.total_successes > 0
    assert (tmp_path / "results" / "summary.md").read_text().count(path.name) >= 1
