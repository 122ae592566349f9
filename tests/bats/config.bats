#!/usr/bin/env bats
# Configuration: every bad value is one clear line, a non-zero exit, and nothing launched.

load test_helper

setup() { common_setup; }
teardown() { common_teardown; }

refused() { # refused "exact message" — start fails with it and never launches vLLM
  run "$KIT/start_service.sh"
  assert_failure 1
  assert_output "$1"
  [ ! -e "$T/args" ]
  [ ! -e "$T/logs/service.pid" ]
}

@test "a port that is not a number is refused by name" {
  PORT=abc refused 'start_service: PORT="abc" is invalid: expected an integer from 1 to 65535'
}

@test "a port above 65535 is refused" {
  PORT=70000 refused 'start_service: PORT="70000" is invalid: expected an integer from 1 to 65535'
}

@test "tensor parallel 0 is refused" {
  TENSOR_PARALLEL_SIZE=0 refused 'start_service: TENSOR_PARALLEL_SIZE="0" is invalid: expected an integer from 1 to 64'
}

@test "GPU memory fraction 1.5 is refused" {
  GPU_MEMORY_UTIL=1.5 refused 'start_service: GPU_MEMORY_UTIL="1.5" is invalid: a fraction, 0 < x <= 1'
}

@test "a negative temperature is refused" {
  TEMPERATURE=-1 refused 'start_service: TEMPERATURE="-1" is invalid: a number from 0 to 2'
}

@test "an unknown device is refused with the choices" {
  DEVICE=tpu refused 'start_service: DEVICE="tpu" is invalid: expected one of: cuda cpu'
}

@test "MAX_TOKENS must leave room for the prompt" {
  MAX_MODEL_LEN=4096 MAX_TOKENS=4096 refused 'start_service: MAX_TOKENS="4096" is invalid: must be below MAX_MODEL_LEN (4096): the prompt needs room'
}

@test "STOP_TIMEOUT must exceed the drain window" {
  SHUTDOWN_DRAIN=30 STOP_TIMEOUT=30 refused 'start_service: STOP_TIMEOUT="30" is invalid: must exceed SHUTDOWN_DRAIN (30 s), or in-flight requests are killed mid-drain'
}

@test "the request guard's settings are checked: Host names, extra routes, request timeout" {
  ALLOWED_HOSTS='evil$(id)' refused 'start_service: ALLOWED_HOSTS="evil$(id)" is invalid: host names separated by commas, e.g. gpu-host.example.com'
  EXTRA_ROUTES=tokenize refused 'start_service: EXTRA_ROUTES="tokenize" is invalid: all, or paths separated by commas, e.g. /tokenize,/v1/completions'
  REQUEST_TIMEOUT=0 refused 'start_service: REQUEST_TIMEOUT="0" is invalid: expected an integer from 1 to 3600'
}

@test "a missing model folder says to run make model" {
  MODEL_PATH=$T/nowhere refused "start_service: MODEL_PATH=$T/nowhere: no such folder ($T/nowhere); run 'make model' to download the weights"
}

@test "a model folder without config.json is refused" {
  rm "$T/model/config.json"
  refused "start_service: MODEL_PATH=$T/model has no config.json: not a model folder (incomplete download? run 'make model')"
}

@test "a model folder without weights is refused unless LOAD_FORMAT=dummy" {
  rm "$T/model/model.safetensors"
  refused "start_service: MODEL_PATH=$T/model has no *.safetensors weights (run 'make model', or LOAD_FORMAT=dummy to benchmark without weights)"
}

@test "an empty MODEL_PATH is refused" {
  MODEL_PATH= refused 'start_service: MODEL_PATH="" is invalid: must name the model folder (run '"'make model'"' to download it)'
}

@test "an unknown variable in the config file is named with its line" {
  printf 'PORT=8003\nMAX_NUM_SEQ=8\n' >"$T/bad.env"
  CAPTIONER_CONFIG=$T/bad.env refused "start_service: $T/bad.env:2: unknown variable MAX_NUM_SEQ (known: see config.env.example)"
}

@test "a line that is not KEY=value is refused" {
  printf 'export PORT 8003\n' >"$T/bad.env"
  CAPTIONER_CONFIG=$T/bad.env refused "start_service: $T/bad.env:1: not a KEY=value line (it has no '='; not shown, as it may be a secret)"
}

@test "a missing config file is refused" {
  CAPTIONER_CONFIG=$T/none.env refused "start_service: config file $T/none.env not found or unreadable: create it from config.env.example"
}

@test "the environment wins over the config file" {
  printf 'PORT=abc\nTOP_K=7\n' >"$T/c.env"
  unset TOP_K
  STUB_EXIT=0 CAPTIONER_CONFIG=$T/c.env run "$KIT/start_service.sh" --foreground
  assert_success
  grep -qx -- "$PORT" "$T/args"
  grep -q '"top_k":7,' "$T/args"
}

@test "the shipped config.env changes nothing: the schema's defaults alone make a valid start" {
  run grep -v -e '^#' -e '^$' "$KIT/config.env"
  assert_output ''
  unset DEVICE MODEL_PATH
  STUB_EXIT=0 CAPTIONER_CONFIG=$KIT/config.env MODEL_PATH=$T/model DEVICE=cpu run "$KIT/start_service.sh" --foreground
  assert_success
  grep -A1 -x -- --max-num-seqs "$T/args" | tail -n 1 | grep -qx 128
}

@test "a setting is its schema default until config.env sets it, and the environment wins over both" {
  STUB_EXIT=0 run "$KIT/start_service.sh" --foreground
  grep -q '"top_k":20,' "$T/args"
  printf 'TOP_K=7\n' >"$T/c.env"
  STUB_EXIT=0 CAPTIONER_CONFIG=$T/c.env run "$KIT/start_service.sh" --foreground
  grep -q '"top_k":7,' "$T/args"
  STUB_EXIT=0 CAPTIONER_CONFIG=$T/c.env TOP_K=3 run "$KIT/start_service.sh" --foreground
  grep -q '"top_k":3,' "$T/args"
}

@test "a quantization vLLM is not asked for by the kit is refused" {
  QUANTIZATION=int4 refused 'start_service: QUANTIZATION="int4" is invalid: expected one of: fp8'
}

@test "vLLM not importable names the Python" {
  STUB_NO_VLLM=1 refused "start_service: vLLM is not importable by $T/vllm-python ($T/vllm-python): run ./install.sh, or set VLLM_PYTHON"
}

@test "a vLLM older than 0.29.0 (engine crashes on ordinary requests) is refused, naming the locked release" {
  STUB_VLLM_VERSION=0.26.0 refused 'start_service: vLLM 0.26.0 is too old: 0.29.0 or newer is needed (older releases crash on ordinary audio requests); run ./install.sh for vLLM 0.32.0'
}

@test "a vLLM other than the locked release gets one warning and starts" {
  STUB_EXIT=0 STUB_VLLM_VERSION=0.30.1 run "$KIT/start_service.sh" --foreground
  assert_success
  assert_output $'start_service: warning: vLLM 0.30.1 is not the locked 0.32.0 that the tests ran; going on (./install.sh installs 0.32.0)\nstub: failing on purpose'
  STUB_EXIT=0 run "$KIT/start_service.sh" --foreground
  assert_success
  assert_output 'stub: failing on purpose'
}

@test "cuda without an NVIDIA driver says to use DEVICE=cpu" {
  mkdir -p "$T/bin"
  ln -s "$(command -v ss)" "$T/bin/ss"
  DEVICE=cuda PATH="$T/bin:/usr/bin:/bin" refused 'start_service: DEVICE=cuda but no NVIDIA driver here (nvidia-smi not found); use DEVICE=cpu for development'
}

@test "too few GPUs for TP x DP is refused" {
  mkdir -p "$T/bin"
  printf '#!/bin/sh\necho "GPU 0: NVIDIA H100 80GB HBM3 (UUID: x)"\n' >"$T/bin/nvidia-smi"
  chmod +x "$T/bin/nvidia-smi"
  DEVICE=cuda TENSOR_PARALLEL_SIZE=2 PATH="$T/bin:$PATH" refused 'start_service: TENSOR_PARALLEL_SIZE=2 x DATA_PARALLEL_SIZE=1 needs 2 GPUs, 1 visible'
}

@test "--help prints the usage and exits 0" {
  run "$KIT/start_service.sh" --help
  assert_success
  assert_line --index 0 --regexp '^start_service\.sh — start the Qwen3-Omni Captioner'
  assert_output --partial "Usage: ./start_service.sh"
}

@test "an unknown option is refused" {
  refused_opt() { run "$KIT/$1" --bogus; assert_failure "$3"; assert_output "$2: unknown option '--bogus' (see --help)"; }
  refused_opt start_service.sh start_service 1
  refused_opt stop_service.sh stop_service 1
  refused_opt status_service.sh status_service 4 # LSB: status unknown
}
