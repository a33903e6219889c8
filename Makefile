# Two commands do all setup on a fresh machine: `make demo` (the main job on the built-in demo teacher)
# and `make test`. Both create .venv first when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint bench clean

$(BIN)/sparsekd-deploy: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: this is the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# [full]: everything the build host needs (the base install is the lean device one; see README, Install).
	$(BIN)/python -m pip install -q -e '.[full,dev]'
	touch $@

install: $(BIN)/sparsekd-deploy

demo: install
	$(BIN)/sparsekd-deploy build --target onnxruntime --out dist/demo --overwrite

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check sparsekd_deploy tests scripts

clean:
	rm -rf $(VENV) runs dist .pytest_cache
