"""Regenerates examples/: a tiny original-format LLaVA-1.5 checkpoint made with the authors' own code.

    .venv-oracle/bin/python examples/regenerate.py

It is the oracle tier's `v15` case (tests/oracle/make_reference.py: built with llava-torch's
LlavaLlamaForCausalLM and saved by its save_pretrained, fp16, `.bin` shards with an index), with its
tiny CLIP tower beside it. Only `mm_vision_tower` is rewritten, to the Hub id a real checkpoint names,
so the example converts with `--vision-tower examples/clip-tiny` like a real one would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, str(HERE.parent / "tests" / "oracle" / "make_reference.py"), "--out", tmp, "--cases", "v15"],
            check=True,
        )
        case = Path(tmp) / "v15"
        for name in ("llava-v1.5-tiny", "clip-tiny"):
            shutil.rmtree(HERE / name, ignore_errors=True)
        shutil.copytree(case / "llava-v1.5-tiny", HERE / "llava-v1.5-tiny")
        shutil.copytree(case / "clip", HERE / "clip-tiny")
        cfg_path = HERE / "llava-v1.5-tiny" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
