#!/usr/bin/env bash
# Main environment (.venv): the package (editable) with its test extras.
# TORCH_SPEC picks the torch build: unset, pip's default (a CUDA build on Linux; it runs on CPU too);
# CI pins the CPU wheel with TORCH_SPEC=torch==2.13.0.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
if [ -n "${TORCH_SPEC:-}" ]; then .venv/bin/pip install -q "$TORCH_SPEC"; fi
.venv/bin/pip install -q -e ".[dev]"
