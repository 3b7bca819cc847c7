"""Frame preprocessing equal to transformers' CLIPImageProcessor (LLaVA-1.5, PLLaVA) and
LlavaNextImageProcessor (any-resolution tiles), for (T, H, W, 3) uint8 RGB frames.

CLIP: resize the shortest edge to ``size`` (PIL bicubic, the long edge ``int(size * long / short)``),
center-crop to ``crop_size``, scale to [0, 1], normalise. LLaVA-NeXT: pick the best grid resolution
for the frame (:func:`select_best_resolution`), resize into it keeping the aspect ratio, zero-pad to
it, cut tiles of ``crop_size``, and put the whole frame squashed to ``size`` x ``size`` first; every
tile then goes through the CLIP steps. Values come from the folder's ``preprocessor_config.json``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def select_best_resolution(size: Sequence[int], resolutions: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) of ``resolutions`` keeping most of an image of ``size`` (h, w), then wasting least."""
    height, width = size
    best, best_effective, best_wasted = None, 0, float("inf")
    for res_h, res_w in resolutions:
        scale = min(res_w / width, res_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = res_w * res_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (res_h, res_w), effective, wasted
    return best


def _resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


class ClipFrameProcessor:
    """CLIPImageProcessor for frames: (T, H, W, 3) uint8 -> (T, 3, crop_h, crop_w) float32."""

    def __init__(self, size: int = 336, crop_size: tuple[int, int] = (336, 336), mean=CLIP_MEAN, std=CLIP_STD,
                 resample: int = Image.BICUBIC, rescale_factor: float = 1 / 255):
        self.size = size
        self.crop_size = tuple(crop_size)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.resample = resample
        self.rescale_factor = rescale_factor

    @staticmethod
    def _read(folder: str | Path) -> dict:
        path = Path(folder) / "preprocessor_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    @classmethod
    def _kwargs(cls, cfg: dict, image_size: int) -> dict:
        size = cfg.get("size", {"shortest_edge": image_size})
        if isinstance(size, dict) and "shortest_edge" not in size:
            raise NotImplementedError(f"image processor size {size} is not supported: expected a shortest_edge")
        size = size if isinstance(size, int) else size["shortest_edge"]
        crop = cfg.get("crop_size", {"height": image_size, "width": image_size})
        crop = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
        return dict(size=size, crop_size=crop, mean=cfg.get("image_mean", CLIP_MEAN),
                    std=cfg.get("image_std", CLIP_STD), resample=cfg.get("resample", Image.BICUBIC),
                    rescale_factor=cfg.get("rescale_factor", 1 / 255))

    @classmethod
    def from_pretrained(cls, folder: str | Path, image_size: int = 336) -> "ClipFrameProcessor":
        """Read ``preprocessor_config.json`` if present; else CLIP statistics at ``image_size``."""
        return cls(**cls._kwargs(cls._read(folder), image_size))

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (3, H, W) float32, as transformers' rescale + normalize."""
        scaled = (image.astype(np.float64) * self.rescale_factor).astype(np.float32)
        return ((scaled - self.mean) / self.std).transpose(2, 0, 1)

    def resize_and_crop(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        short, long = min(height, width), max(height, width)
        new_long = int(self.size * long / short)
        new_h, new_w = (new_long, self.size) if width <= height else (self.size, new_long)
        image = _resize(image, new_h, new_w, self.resample)
        crop_h, crop_w = self.crop_size
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        if top < 0 or left < 0:
            raise ValueError(f"a {new_h}x{new_w} frame is smaller than the {crop_h}x{crop_w} crop")
        return image[top:top + crop_h, left:left + crop_w]

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return np.stack([self.normalize(self.resize_and_crop(frame)) for frame in frames])


class LlavaNextFrameProcessor(ClipFrameProcessor):
    """LlavaNextImageProcessor for frames: -> pixel_values (T, tiles, 3, crop, crop), image_sizes (T, 2)."""

    def __init__(self, grid_pinpoints: Sequence[Sequence[int]], **kwargs):
        super().__init__(**kwargs)
        self.grid_pinpoints = [tuple(p) for p in grid_pinpoints]

    @classmethod
    def from_pretrained(cls, folder: str | Path, image_size: int = 336,
                        grid_pinpoints: Sequence[Sequence[int]] | None = None) -> "LlavaNextFrameProcessor":
        cfg = cls._read(folder)
        pinpoints = cfg.get("image_grid_pinpoints", grid_pinpoints)
        return cls(pinpoints, **cls._kwargs(cfg, image_size))

    def tiles(self, image: np.ndarray) -> list[np.ndarray]:
        """The squashed whole frame, then the tiles of the padded best-resolution frame (row-major)."""
        height, width = image.shape[:2]
        target_h, target_w = select_best_resolution((height, width), self.grid_pinpoints)
        if target_w / width < target_h / height:
            new_h, new_w = min(math.ceil(height * target_w / width), target_h), target_w
        else:
            new_h, new_w = target_h, min(math.ceil(width * target_h / height), target_w)
        resized = _resize(image, new_h, new_w, self.resample)
        top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
        padded = np.zeros((target_h, target_w, image.shape[2]), image.dtype)
        padded[top:top + new_h, left:left + new_w] = resized
        tile = self.crop_size[0]
        pieces = [padded[i:i + tile, j:j + tile] for i in range(0, target_h, tile) for j in range(0, target_w, tile)]
        return [_resize(image, self.size, self.size, self.resample)] + pieces

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pixel_values = np.stack([np.stack([self.normalize(self.resize_and_crop(t)) for t in self.tiles(frame)])
                                 for frame in frames])
        sizes = np.array([frame.shape[:2] for frame in frames], np.int64)
        return pixel_values, sizes


class PllavaFrameProcessor(ClipFrameProcessor):
    """PllavaProcessor for one video: a first resize of all frames, then CLIPImageProcessor.

    The first resize sets the short edge to max(size, min(short, int(min(640, long) / aspect))),
    so frames larger than 640 px on the long side are scaled down before the CLIP resize.
    """

    max_long_edge = 640

    def prescale(self, frame: np.ndarray) -> np.ndarray:
        height, width = frame.shape[:2]
        short, long = min(height, width), max(height, width)
        target = max(min(short, int(min(self.max_long_edge, long) / (long / short))), self.size)
        new_long = int(target * long / short)
        new_h, new_w = (new_long, target) if width <= height else (target, new_long)
        return _resize(frame, new_h, new_w, self.resample)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return super().__call__(np.stack([self.prescale(frame) for frame in frames]))
