"""Shared fixtures: seeded tiny checkpoints, and the oracle tier's references made by the authors' code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "oracle"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def oracle_python() -> Path:
    """The isolated venv with the authors' code (llava-torch + transformers 4.36.2); see .ci/run."""
    return Path(os.environ.get("LLAVA_ORACLE_PYTHON", REPO / ".venv-oracle" / "bin" / "python"))


def _oracle_root(tmp_path_factory, *, root_env: str, python: Path, python_env: str, script: str,
                 builder: str, timeout: int) -> Path:
    """The root ROOT_ENV names (a root the builder already wrote, to iterate without rebuilding), else one
    built now with the authors' code: PYTHON runs `tests/BUILDER/make_reference.py --out ROOT`."""
    if os.environ.get(root_env):
        return Path(os.environ[root_env])
    if not python.exists():
        pytest.fail(
            f"{builder} interpreter {python} not found: run {script} (or set {python_env}), "
            "or deselect this tier with -m 'not oracle'"
        )
    root = tmp_path_factory.mktemp(builder)
    proc = subprocess.run(
        [str(python), str(HERE / builder / "make_reference.py"), "--out", str(root)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(f"{builder}/make_reference.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return root


@pytest.fixture(scope="session")
def oracle_root(tmp_path_factory) -> Path:
    """Every haotian-liu/LLaVA oracle case, built once per session (or LLAVA_ORACLE_ROOT)."""
    return _oracle_root(tmp_path_factory, root_env="LLAVA_ORACLE_ROOT", python=oracle_python(),
                        python_env="LLAVA_ORACLE_PYTHON", script="scripts/envs/20-oracle.sh", builder="oracle",
                        timeout=1800)


def oracle_next_python() -> Path:
    """The isolated venv with the LLaVA-NeXT authors' code (llavaction + transformers 4.40.2)."""
    return Path(os.environ.get("LLAVA_ORACLE_NEXT_PYTHON", REPO / ".venv-oracle-next" / "bin" / "python"))


@pytest.fixture(scope="session")
def oracle_next_root(tmp_path_factory) -> Path:
    """Every LLaVA-NeXT-repository oracle case, built once per session (or LLAVA_ORACLE_NEXT_ROOT)."""
    return _oracle_root(tmp_path_factory, root_env="LLAVA_ORACLE_NEXT_ROOT", python=oracle_next_python(),
                        python_env="LLAVA_ORACLE_NEXT_PYTHON", script="scripts/envs/25-oracle-next.sh",
                        builder="oracle_next", timeout=3600)


@pytest.fixture(scope="session")
def oracle_case(oracle_root):
    def get(name: str) -> Path:
        path = oracle_root / name
        assert (path / "reference.pt").is_file(), f"oracle case {name} was not built"
        return path

    return get


EXAMPLE = REPO / "examples" / "llava-v1.5-tiny"
EXAMPLE_TOWER = REPO / "examples" / "clip-tiny"


@pytest.fixture(scope="session")
def example_conversion(tmp_path_factory) -> Path:
    """The bundled example converted once per session (float16, one shard), with its model card."""
    from llava_convert.convert import convert

    out = tmp_path_factory.mktemp("example") / "llava-v1.5-tiny-hf"
    convert(EXAMPLE, out, vision_tower=EXAMPLE_TOWER, progress=False)
    return out
