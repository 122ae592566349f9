#!/usr/bin/env bash
# demo.sh — the embedded default: start the service on the tiny model (CPU), print the caption
# page's URL, caption the sample clip shipped in samples/, print the result, stop. No GPU and no
# weights needed. Run from a terminal, it keeps the service up for the page until Enter.
#
# Usage: tools/demo.sh      (make demo builds the venv and the tiny model first)
# DEMO_PORT (default 18003) and DEMO_LOG_DIR (default logs/demo) keep it clear of a real service.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CAPTIONER_CONFIG=/dev/null DEVICE=cpu MODEL_PATH=models/tiny-captioner
export SERVED_MODEL_NAME=tiny-captioner PORT=${DEMO_PORT:-18003} LOG_DIR=${DEMO_LOG_DIR:-logs/demo}
export MAX_MODEL_LEN=4096 MAX_TOKENS=48 MAX_NUM_SEQS=8 API_SERVER_COUNT=1

trap './stop_service.sh' EXIT
./start_service.sh
echo "--- caption page: http://127.0.0.1:$PORT/ (from another machine: ssh -N -L $PORT:127.0.0.1:$PORT host)"
echo "--- caption of samples/sample.wav (random weights: the text is gibberish, the pipeline is real)"
.venv/bin/python test_client.py --base-url "http://127.0.0.1:$PORT" --format json samples/sample.wav
if [[ -t 0 ]]; then
  read -r -p "--- the page at http://127.0.0.1:$PORT/ works until the service stops: press Enter to stop it " || true
fi
