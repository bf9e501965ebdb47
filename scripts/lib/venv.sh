# Sourced by scripts/envs/*.sh (run from the repository root): `venv_with_torch DIR` creates the virtual
# environment DIR if missing and installs torch in it: TORCH_SPEC when set, else the main environment's torch
# release (pip reuses the wheel it has), else pip's default.
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

venv_with_torch() {
    local venv=$1 spec=${TORCH_SPEC:-}
    if [ -z "$spec" ]; then
        spec=torch==$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo "")
        [ "$spec" = "torch==" ] && spec=torch
    fi
    if [ ! -x "$venv/bin/python" ]; then "${PYTHON:-python3}" -m venv "$venv"; fi
    "$venv/bin/pip" install -q "$spec"
}
