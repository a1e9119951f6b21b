#!/usr/bin/env bash
# Set everything up, then run the whole test suite serially (offline; tiny random models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q -p no:cacheprovider "$@"
