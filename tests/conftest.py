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


@pytest.fixture(scope="session")
def oracle_root(tmp_path_factory) -> Path:
    """Build every oracle case once per session with the authors' code and return the root folder.

    LLAVA_ORACLE_ROOT names a root that make_reference.py already wrote (to iterate without rebuilding)."""
    if os.environ.get("LLAVA_ORACLE_ROOT"):
        return Path(os.environ["LLAVA_ORACLE_ROOT"])
    py = oracle_python()
    if not py.exists():
        pytest.fail(
            f"oracle interpreter {py} not found: run .ci/run (or set LLAVA_ORACLE_PYTHON), "
            "or deselect this tier with -m 'not oracle'"
        )
    root = tmp_path_factory.mktemp("oracle")
    proc = subprocess.run(
        [str(py), str(HERE / "oracle" / "make_reference.py"), "--out", str(root)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        pytest.fail(f"make_reference.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return root


def oracle_next_python() -> Path:
    """The isolated venv with the LLaVA-NeXT authors' code (llavaction + transformers 4.40.2)."""
    return Path(os.environ.get("LLAVA_ORACLE_NEXT_PYTHON", REPO / ".venv-oracle-next" / "bin" / "python"))


@pytest.fixture(scope="session")
def oracle_next_root(tmp_path_factory) -> Path:
    """Build every LLaVA-NeXT-family case once per session with the authors' code; return the root folder.

    LLAVA_ORACLE_NEXT_ROOT names a root that make_reference.py already wrote (to iterate without rebuilding)."""
    if os.environ.get("LLAVA_ORACLE_NEXT_ROOT"):
        return Path(os.environ["LLAVA_ORACLE_NEXT_ROOT"])
    py = oracle_next_python()
    if not py.exists():
        pytest.fail(
            f"oracle-next interpreter {py} not found: run scripts/envs/25-oracle-next.sh (or set LLAVA_ORACLE_NEXT_PYTHON), "
            "or deselect this tier with -m 'not oracle'"
        )
    root = tmp_path_factory.mktemp("oracle_next")
    proc = subprocess.run(
        [str(py), str(HERE / "oracle_next" / "make_reference.py"), "--out", str(root)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        pytest.fail(f"oracle_next/make_reference.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return root


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
