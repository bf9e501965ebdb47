#!/usr/bin/env bash
# Compatibility environment (.venv-compat): the last transformers 4.x (4.57) with its own dependencies,
# to load converted checkpoints the way 4.x users do. Inside it, .venv-compat/tf439 holds transformers
# 4.39.3 (the first release with LLaVA-NeXT) and its tokenizers, put first on PYTHONPATH by the tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/venv.sh
venv_with_torch .venv-compat
.venv-compat/bin/pip install -q "transformers==4.57.6" sentencepiece protobuf pillow numpy safetensors \
    "accelerate>=1.1" "bitsandbytes>=0.45"
.venv-compat/bin/pip install -q --no-deps --upgrade --target .venv-compat/tf439 \
    "transformers==4.39.3" "tokenizers==0.15.2"
