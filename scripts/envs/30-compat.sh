#!/usr/bin/env bash
# Compatibility environment (.venv-compat): the last transformers 4.x (4.57) with its own dependencies,
# to load converted checkpoints the way 4.x users do. Inside it, .venv-compat/tf439 holds transformers
# 4.39.3 (the first release with LLaVA-NeXT) and its tokenizers, put first on PYTHONPATH by the tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
# The main environment's torch release unless TORCH_SPEC says otherwise (pip reuses the wheel it has).
TORCH_SPEC=${TORCH_SPEC:-torch==$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo "")}
[ "$TORCH_SPEC" = "torch==" ] && TORCH_SPEC=torch
if [ ! -x .venv-compat/bin/python ]; then "$PY" -m venv .venv-compat; fi
.venv-compat/bin/pip install -q "$TORCH_SPEC"
.venv-compat/bin/pip install -q "transformers==4.57.6" sentencepiece protobuf pillow numpy safetensors \
    "accelerate>=1.1" "bitsandbytes>=0.45"
.venv-compat/bin/pip install -q --no-deps --upgrade --target .venv-compat/tf439 \
    "transformers==4.39.3" "tokenizers==0.15.2"
