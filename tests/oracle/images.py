"""Deterministic test images shared by the oracle builder and the tests.

Pure PIL + numpy (no torch) so it imports in both the oracle venv (transformers 4.36 + llava-torch)
and the main venv (transformers 5). Never change the pixels without regenerating the oracle
references: every recorded ``pixel_values`` / ``logits`` depends on them.

Sizes are chosen so that with the oracle's anyres pinpoints (multiples of a 28-pixel tower:
[[28,56],[56,28],[56,56],[28,84],[84,28]]) each image picks a different grid:

* ``landscape`` 97x41 (aspect 2.37) -> 84x28 (3x1 crops), unpad drops columns
* ``portrait``  41x97 (aspect 0.42) -> 28x84 (1x3 crops), unpad drops rows
* ``square``    61x61               -> 56x56 (2x2 crops), no unpad

and in the ``pad`` / ``square`` (shortest-edge resize + centre crop) paths the non-square ones are
padded or cropped, so a wrong preprocessing rule changes the pixels.

``ANYRES_336`` are for a case with the released 336-pixel tower and pinpoints. An image no larger than the
tower on both sides upscales equally into several candidate grids, and the first listed wins: the authors,
reading each pinpoint as (width, height), give 300x180 and 180x300 one tile wide and two tall, where
transformers, reading (height, width), would pick two wide and one tall. ``square_336`` is exactly the
tower's size, ``icon_64x40`` far below it, and ``large_1000x600`` larger than every candidate (no tie).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SIZES: dict[str, tuple[int, int]] = {  # name -> (width, height), PIL convention
    "landscape": (97, 41),
    "portrait": (41, 97),
    "square": (61, 61),
}

_SEEDS = {"landscape": 1234, "portrait": 5678, "square": 9012}

ANYRES_336: dict[str, tuple[int, int]] = {
    "wide_300x180": (300, 180),
    "tall_180x300": (180, 300),
    "square_336": (336, 336),
    "large_1000x600": (1000, 600),
    "icon_64x40": (64, 40),
}
_SEEDS.update({name: 3100 + i for i, name in enumerate(ANYRES_336)})
_ALL = {**SIZES, **ANYRES_336}


def _make(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    u = xx / max(width - 1, 1)
    v = yy / max(height - 1, 1)
    # Smooth, channel-distinct gradients plus a low-frequency ripple.
    r = 255.0 * u
    g = 255.0 * v
    b = 127.5 + 127.5 * np.sin(2.0 * np.pi * (1.5 * u + 0.75 * v))
    arr = np.stack([r, g, b], axis=-1)
    # Seeded noise so that interpolation / crop offsets show up in every channel.
    arr += rng.normal(0.0, 18.0, size=arr.shape)
    arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr).convert("RGB")

    # Hard-edged shapes (seeded positions / colours): sensitive to resize filters and offsets.
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0 = int(rng.integers(0, max(width - 8, 1)))
        y0 = int(rng.integers(0, max(height - 8, 1)))
        x1 = min(width - 1, x0 + int(rng.integers(6, max(width // 2, 7))))
        y1 = min(height - 1, y0 + int(rng.integers(6, max(height // 2, 7))))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
    # A thin diagonal line and a one-pixel border on two sides (edges matter for padding/cropping).
    draw.line([(0, 0), (width - 1, height - 1)], fill=(255, 255, 255), width=1)
    draw.line([(0, height - 1), (width - 1, height - 1)], fill=(0, 0, 0), width=1)
    draw.line([(width - 1, 0), (width - 1, height - 1)], fill=(255, 0, 255), width=1)
    return img


def test_images(names=None) -> dict[str, Image.Image]:
    """Name -> fresh RGB PIL image (default: landscape, portrait, square; NAMES picks any). Deterministic."""
    names = list(SIZES) if names is None else list(names)
    return {name: _make(*_ALL[name], _SEEDS[name]) for name in names}


# Keep pytest from collecting the helper above as a test when this module is imported by tests.
test_images.__test__ = False  # type: ignore[attr-defined]
