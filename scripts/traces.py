"""Rule traces: teacher completions for the train prompts (cache kept outside the declared outputs)."""

from pathlib import Path

from mathpt.io import read_jsonl
from mathpt.pipeline import run_script
from mathpt.teachers.dispatch import generate_traces


def main(smk, cfg):
    rows = read_jsonl(smk.input.train)
    teacher = dict(cfg["teacher"])
    if teacher["kind"] == "local":  # default: the base model through the project's engine
        teacher.setdefault("model_path", smk.input.model)
        teacher.setdefault("engine", cfg["runtime"]["engine"])
    generate_traces(
        teacher,
        rows,
        cfg["prompt_style"],
        smk.output.traces,
        work_dir=Path(smk.output.traces).parent / ".work",
    )


if __name__ == "__main__":  # engines spawn processes that re-import this file
    run_script(snakemake, main)  # noqa: F821
