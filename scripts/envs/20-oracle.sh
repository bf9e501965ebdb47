#!/usr/bin/env bash
# Oracle environment (.venv-oracle): the LLaVA authors' own code (llava-torch 1.2.2.post1 =
# haotian-liu/LLaVA) with the transformers it was written for (4.36.2), isolated from the main
# environment. --no-deps: its pins (torch 2.0.1, a CUDA stack) are not needed to run it on CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/venv.sh
venv_with_torch .venv-oracle
.venv-oracle/bin/pip install -q --no-deps llava-torch==1.2.2.post1
.venv-oracle/bin/pip install -q "transformers==4.36.2" "tokenizers>=0.15,<0.16" sentencepiece protobuf pillow \
    accelerate numpy safetensors "huggingface-hub<1" peft==0.10.0
