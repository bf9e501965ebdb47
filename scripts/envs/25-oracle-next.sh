#!/usr/bin/env bash
# .venv-oracle-next: the LLaVA-NeXT authors' code (lmms-lab/LLaVA-NeXT, shipped on PyPI as llavaction 0.0.1:
# its `llava` package renamed `llavaction`) with the transformers the authors pinned (4.40.2), for the oracle
# tier of the OneVision / Interleave / llama3-llava-next / llava-next-72b families (tests/oracle_next/).
# --no-deps: its pins (a CUDA torch, deepspeed, flash-attn, ...) are not needed to run it on CPU; what its
# imports need on CPU is listed below (accelerate: the authors load with low_cpu_mem_usage=True). Idempotent;
# run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=.venv-oracle-next
. scripts/lib/venv.sh
venv_with_torch "$VENV"
"$VENV/bin/pip" install -q --no-deps llavaction==0.0.1
"$VENV/bin/pip" install -q "transformers==4.40.2" "tokenizers>=0.19,<0.20" "huggingface-hub<1" \
    safetensors pillow einops numpy accelerate==0.30.1
# Offline: llavaction.conversation fetches a Llama-3 tokenizer from the Hub at import.
HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "import llavaction.model, llavaction.conversation, llavaction.mm_utils"
