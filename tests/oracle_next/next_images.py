"""Deterministic test images for the LLaVA-NeXT-repository oracle (OneVision, Interleave, llama3-llava-next, next-72b).

Pure PIL + numpy, importable from the oracle-next venv and the main venv. The drawing is the one of
``tests/oracle/images.py`` (same generator), at sizes chosen for 384 / 336-pixel towers: with the
OneVision grid "(1x1),...,(6x6)" (x 384) and ``anyres_max_9`` each image takes a different path of the
authors' ``prepare_inputs_labels_for_multimodal``:

* ``landscape`` 700x300  -> 768x384 grid (2x1), unpad drops rows, no downscale
* ``portrait``  300x700  -> 384x768 grid (1x2), unpad drops columns, no downscale
* ``wide``      1600x250 -> 1920x384 grid (5x1), very wide: unpad keeps few rows
* ``large``     1500x1200 -> 1536x1536 grid (4x4): after unpad more than 1.1 x 9 crops of features,
                so the authors' bilinear downscale (``times > 1.1``) runs

Never change the pixels without regenerating the references.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "oracle"))
from images import _make  # noqa: E402  (the shared generator of tests/oracle/images.py)

SIZES: dict[str, tuple[int, int]] = {  # name -> (width, height), PIL convention
    "landscape": (700, 300),
    "portrait": (300, 700),
    "wide": (1600, 250),
    "large": (1500, 1200),
}

_SEEDS = {"landscape": 2101, "portrait": 2102, "wide": 2103, "large": 2104}


def test_images_next() -> dict[str, Image.Image]:
    """Name -> fresh RGB PIL image. Deterministic."""
    return {name: _make(w, h, _SEEDS[name]) for name, (w, h) in SIZES.items()}


# Keep pytest from collecting the helper above as a test when this module is imported by tests.
test_images_next.__test__ = False  # type: ignore[attr-defined]
