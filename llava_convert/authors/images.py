"""The authors' image preprocessing (`llava/mm_utils.py`) and unpadding (`llava/model/llava_arch.py`).

`process_image` is `process_images([image], image_processor, config)` for one image: CLIP's own crop,
`pad` (expand to a square filled with the mean colour), or `anyres` / `anyres_max_N` (the base image plus tiles
of the best grid in `image_grid_pinpoints`, read as (width, height) pairs; LLaVA-NeXT's range strings
`"(1x1),...,(6x6)"` expanded by the tile size). LLaVA-NeXT's merging adds the `anyres_max_N` downscale of
the unpadded grid and the authors' SigLIP preprocessor (`SiglipPreprocessor`). The reference runs these; the
converter takes the pinpoints' reading from here (`hfconfig.hf_grid_pinpoints`).
"""

from __future__ import annotations

import ast
import math
import re

import numpy as np
import torch
from PIL import Image

from ..errors import LlavaConvertError

SIGLIP_SIZE = 384  # SigLipImageProcessor() and SigLipVisionConfig() defaults, hard-coded by the authors
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def select_best_resolution(original_size: tuple[int, int], possible: list) -> tuple[int, int]:
    original_width, original_height = original_size
    best_fit = None
    max_effective = 0
    min_wasted = float("inf")
    for width, height in possible:
        scale = min(width / original_width, height / original_height)
        dw, dh = int(original_width * scale), int(original_height * scale)
        effective = min(dw * dh, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (width, height)
    assert best_fit is not None
    return best_fit


def resize_and_pad_image(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    original_width, original_height = image.size
    target_width, target_height = target
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        new_width = target_width
        new_height = min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height = target_height
        new_width = min(math.ceil(original_width * scale_h), target_width)
    resized = image.resize((new_width, new_height))
    new_image = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    new_image.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return new_image


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    width, height = image.size
    return [
        image.crop((j, i, j + patch_size, i + patch_size))
        for i in range(0, height, patch_size)
        for j in range(0, width, patch_size)
    ]


def parse_pinpoints(grid_pinpoints) -> list:
    """`image_grid_pinpoints` as a list of (width, height) pairs (the authors' configs may hold its repr)."""
    return grid_pinpoints if isinstance(grid_pinpoints, list) else ast.literal_eval(grid_pinpoints)


_PINPOINT_PAIR = re.compile(r"\((\d+)x(\d+)\)")


def expand_pinpoints(grid_pinpoints, tile: int, *, where: str = "config.json") -> list[list[int]]:
    """`image_grid_pinpoints` as the LLaVA-NeXT repository reads it: a range `"(AxB),...,(CxD)"` (OneVision)
    is every `[i * tile, j * tile]` for i in A..C (outer), j in B..D (inner), from its first and last pair
    only; a list (or its repr) stays as it is. WHERE names the file in the error for a range without pairs."""
    if isinstance(grid_pinpoints, str) and "x" in grid_pinpoints:
        found = _PINPOINT_PAIR.findall(grid_pinpoints)
        if not found:
            raise LlavaConvertError(f"{where}: image_grid_pinpoints {grid_pinpoints!r} is neither a list nor a range")
        (a, b), (c, d) = tuple(map(int, found[0])), tuple(map(int, found[-1]))
        return [[i * tile, j * tile] for i in range(a, c + 1) for j in range(b, d + 1)]
    return [list(p) for p in parse_pinpoints(grid_pinpoints)]


def get_anyres_image_grid_shape(
    image_size: tuple[int, int], grid_pinpoints, patch_size: int
) -> tuple[int, int]:
    """(columns, rows) of the tile grid (range pinpoints expanded by PATCH_SIZE, the tile side)."""
    width, height = select_best_resolution(image_size, expand_pinpoints(grid_pinpoints, patch_size))
    return width // patch_size, height // patch_size


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return result


def _preprocess(processor, image: Image.Image) -> torch.Tensor:
    return processor.preprocess(image, return_tensors="pt")["pixel_values"][0]


def tile_size(processor) -> tuple[int, int]:
    """(the tile side a pinpoint range is expanded by, the base image's side) as `process_anyres_image` reads
    them from the processor: CLIP's `size={"shortest_edge": S}`, the authors' SigLIP `size=(S, S)`."""
    size = processor.size
    if isinstance(size, (tuple, list)):
        return size[0], min(size)
    return size["shortest_edge"], size["shortest_edge"]


def process_anyres_image(image: Image.Image, processor, grid_pinpoints) -> torch.Tensor:
    tile, side = tile_size(processor)
    best = select_best_resolution(image.size, expand_pinpoints(grid_pinpoints, tile))
    padded = resize_and_pad_image(image, best)
    patches = divide_to_patches(padded, processor.crop_size["height"])
    base = image.resize((side, side))
    return torch.stack([_preprocess(processor, p) for p in [base, *patches]], dim=0)


def process_image(image: Image.Image, processor, aspect: str | None, grid_pinpoints=None) -> torch.Tensor:
    """`process_images([image], ...)`: `[1, 3, S, S]`, or `[1, N, 3, S, S]` for anyres."""
    if aspect == "pad":
        background = tuple(int(x * 255) for x in processor.image_mean)
        return _preprocess(processor, expand2square(image, background))[None]
    if aspect is not None and aspect.startswith("anyres"):  # anyres, anyres_max_N
        return process_anyres_image(image, processor, grid_pinpoints)[None]
    return processor(image, return_tensors="pt")["pixel_values"]


def unpad_image(tensor: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """`llava_arch.unpad_image`; ORIGINAL_SIZE is (width, height) as the authors pass `image.size`."""
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return tensor[:, padding : current_height - padding, :]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding : current_width - padding]


def unpad_image_transformers(tensor: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """transformers' `unpad_image` (rounds the scaled side to 7 decimals before `int`): a known-wrong variant
    for `check`'s hints. Differs from the authors' where float arithmetic lands just below an integer."""
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return tensor[:, padding : current_height - padding, :]
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding : current_width - padding]


def anyres_max_tiles(aspect: str | None) -> int | None:
    """N of `image_aspect_ratio: anyres_max_N`, or None."""
    m = re.match(r"anyres_max_(\d+)", aspect or "")
    return int(m.group(1)) if m else None


def downscale_anyres_max(feature: torch.Tensor, max_tiles: int, unit: int) -> torch.Tensor:
    """LLaVA-NeXT's `anyres_max_N` step on an unpadded `[C, H, W]` grid of UNIT x UNIT tiles: a bilinear shrink
    to `int(H // t), int(W // t)` when `t = sqrt(H * W / (N * unit**2))` exceeds 1.1, else unchanged."""
    _, h, w = feature.shape
    times = math.sqrt(h * w / (max_tiles * unit**2))
    if times > 1.1:
        size = [int(h // times), int(w // times)]
        feature = torch.nn.functional.interpolate(feature[None], size, mode="bilinear")[0]
    return feature


class SiglipPreprocessor:
    """The authors' `SigLipImageProcessor()` (LLaVA-NeXT's `siglip_encoder.py`): resize to 384x384 (PIL
    bicubic), rescale 1/255, normalise with mean = std = 0.5 whatever the tower says; channels first, float32."""

    def __init__(self, size: int = SIGLIP_SIZE):
        self.size = (size, size)
        self.crop_size = {"height": size, "width": size}
        self.image_mean = SIGLIP_MEAN
        self.image_std = SIGLIP_STD

    def preprocess(self, image: Image.Image, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        resized = image.convert("RGB").resize((self.size[1], self.size[0]), Image.Resampling.BICUBIC)
        arr = (np.asarray(resized) * (1 / 255)).astype(np.float32)
        arr = (arr - np.array(self.image_mean, dtype=np.float32)) / np.array(self.image_std, dtype=np.float32)
        return {"pixel_values": torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]}

    __call__ = preprocess
