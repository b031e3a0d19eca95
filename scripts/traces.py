"""Rule traces: teacher completions for the train prompts."""
from pathlib import Path

from mathpt.io import read_jsonl
from mathpt.pipeline import run_script
from mathpt.teachers.dispatch import generate_traces


def main(smk, cfg):
    rows = read_jsonl(smk.input.train)
    teacher = {**cfg["teacher"], "model_path": smk.input.model, "runtime": cfg["runtime"]}
    generate_traces(teacher, rows, cfg["prompt_style"], smk.output.traces,
                    work_dir=Path("results/traces/.cache"))


run_script(snakemake, main)  # noqa: F821
