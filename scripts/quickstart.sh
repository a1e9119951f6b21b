#!/usr/bin/env bash
# README command 1: set up (venv, CPU torch, the embedded SmolLM2 model), then run the
# quickstart end to end and print the table. Offline after set-up; ~15 minutes on 2 CPU cores.
# Extra arguments go to `aligndistil quickstart` (e.g. --config configs/pipelines/full.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec aligndistil quickstart "$@"
