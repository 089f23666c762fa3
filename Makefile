# `make demo` and `make test` build .venv on first use and reinstall only when pyproject.toml changes.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
LINT_PATHS := $(wildcard infcl tests examples benchmarks docs/*.py)

.PHONY: install demo demo-loss test lint pytest interpret docs

$(BIN)/python:
	python3 -m venv $(VENV)

# open_clip (the example, the ClipLoss comparison tests) needs torchvision. PyPI's torchvision
# does not load beside the local torch 2.13.0 CPU file, while torch 2.14.1 and torchvision
# 0.29.1 lie on these machines' disk as a pair (from /opt/pypi-more, no download; torch 2.14.1
# brings triton 3.8). Both stay pinned in the second install too, or pip trades them for a pair
# that does not import. The grep drops pip's notes about local index folders it does not need.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 -e '.[test,docs,bench,example]' 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# The main job: a small CLIP trained on generated shapes through the gradient cache, then
# zero-shot accuracy and retrieval recall on a held-out split.
demo: $(STAMP)
	$(BIN)/python examples/clip/demo.py

# naive vs chunked on this machine as the batch grows: agreement, time, peak memory
demo-loss: $(STAMP)
	$(BIN)/python examples/demo_naive_vs_chunked.py

test: lint pytest interpret docs

lint: $(STAMP)
	$(BIN)/ruff check -q $(LINT_PATHS)

# Skipped only while tests/ has no test file; after that any failure counts, even exit code 5
# (nothing collected).
pytest: $(STAMP)
	@if ! compgen -G 'tests/test_*.py' >/dev/null; then \
		echo "pytest: no tests/test_*.py yet, nothing to run"; exit 0; fi; \
	echo "pytest -q tests"; \
	$(BIN)/pytest -q tests

# Kernel logic on CPU: the tests marked `interpret` again, with Triton's interpreter.
# Its output is shown unless nothing was selected (exit code 5), which is not a failure.
interpret: $(STAMP)
	@if ! compgen -G 'tests/test_*.py' >/dev/null; then exit 0; fi; \
	echo "TRITON_INTERPRET=1 pytest -q tests -m interpret"; \
	rc=0; out=$$(TRITON_INTERPRET=1 $(BIN)/pytest -q tests -m interpret 2>&1) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "(no tests marked interpret yet)"; exit 0; fi; \
	echo "$$out"; exit $$rc

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q
