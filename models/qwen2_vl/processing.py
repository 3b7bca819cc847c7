"""Qwen2-VL image and video preprocessing, equal to transformers' PIL image processor frame by frame.

Each frame is resized (PIL bicubic) so both sides are multiples of ``patch_size * merge_size``
(28) with a pixel count inside ``[min_pixels, max_pixels]``, scaled to [0, 1] and normalised
with the CLIP mean/std. Frames are padded to a multiple of ``temporal_patch_size`` (2) by
repeating the last one, then cut into rows of ``C * temporal_patch * patch * patch`` values,
ordered (t, h/2, w/2, 2, 2) so that every 4 consecutive rows are one 2x2 group the vision
merger fuses into one language-model token.

Settings come from the checkpoint's ``preprocessor_config.json`` (and
``video_preprocessor_config.json`` for videos when present), else Qwen2-VL's defaults.
transformers 5's video processor (torchvision, the only video path it has) computes the same
numbers up to float rounding of its fused normalisation, and its torchvision resize where frames
are not already multiples of 28.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_PIXELS = (56 * 56, 28 * 28 * 1280)  # Qwen2VLImageProcessor's (min_pixels, max_pixels)
VIDEO_PIXELS = (128 * 28 * 28, 28 * 28 * 768)  # Qwen2VLVideoProcessor's


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = IMAGE_PIXELS[0],
                 max_pixels: int = IMAGE_PIXELS[1], num_frames: int = 1, temporal_factor: int = 1) -> tuple[int, int]:
    """The (height, width) nearest the input's aspect ratio with sides multiples of ``factor``
    and a pixel count within ``[min_pixels, max_pixels]`` (transformers' rule).

    With a ``temporal_factor`` (Qwen3-VL's video rule) the limits hold for all ``num_frames`` frames together,
    compared with their count rounded to ``temporal_factor``, and a side shorter than ``factor`` is first
    scaled up."""
    if num_frames < temporal_factor:
        raise ValueError(f"{num_frames} frames, fewer than the temporal patch of {temporal_factor}")
    if temporal_factor > 1 and (height < factor or width < factor):
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _pixel_range(cfg: dict, default: tuple[int, int]) -> tuple[int, int]:
    size = cfg.get("size") or {}
    low = cfg.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or default[0]
    high = cfg.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or default[1]
    return int(low), int(high)


class Qwen2VLVisionProcessor:
    """Frames (uint8 RGB, H x W x 3) -> ``pixel_values`` rows and ``grid_thw`` for the vision tower."""

    def __init__(self, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2,
                 mean=CLIP_MEAN, std=CLIP_STD, rescale_factor: float = 1 / 255,
                 image_pixels: tuple[int, int] = IMAGE_PIXELS, video_pixels: tuple[int, int] = VIDEO_PIXELS,
                 resample: int = Image.BICUBIC):
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.mean = np.asarray(mean, np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, np.float32).reshape(1, 1, 3)
        self.rescale_factor = rescale_factor
        self.image_pixels = image_pixels
        self.video_pixels = video_pixels
        self.resample = resample

    # from_pretrained's values for what a checkpoint's config does not say (a family overrides them)
    defaults = {"patch_size": 14, "mean": CLIP_MEAN, "std": CLIP_STD, "image_pixels": IMAGE_PIXELS,
                "video_pixels": VIDEO_PIXELS}

    @classmethod
    def from_pretrained(cls, folder: str | Path, **options) -> "Qwen2VLVisionProcessor":
        """Settings of a checkpoint folder (missing files or keys: the family's ``defaults``); ``options``
        go to the constructor."""
        folder = Path(folder)

        def read(name: str) -> dict:
            path = folder / name
            return json.loads(path.read_text()) if path.is_file() else {}

        cfg = read("preprocessor_config.json")
        video_cfg = {**cfg, **read("video_preprocessor_config.json")}
        d = cls.defaults
        return cls(patch_size=cfg.get("patch_size", d["patch_size"]),
                   temporal_patch_size=cfg.get("temporal_patch_size", 2), merge_size=cfg.get("merge_size", 2),
                   mean=cfg.get("image_mean", d["mean"]), std=cfg.get("image_std", d["std"]),
                   rescale_factor=cfg.get("rescale_factor", 1 / 255),
                   image_pixels=_pixel_range(cfg, d["image_pixels"]),
                   video_pixels=_pixel_range(video_cfg, d["video_pixels"]),
                   resample=cfg.get("resample", Image.BICUBIC), **options)

    def images(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Images -> (``pixel_values`` (sum of t*h*w, C*2*14*14) float32, ``image_grid_thw`` (n, 3) int64)."""
        factor = self.patch_size * self.merge_size
        rows, grids = zip(*(self._patchify(image[None], smart_resize(*image.shape[:2], factor, *self.image_pixels))
                            for image in images))
        return np.concatenate(rows), np.asarray(grids, np.int64)

    def video(self, frames: np.ndarray, max_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(T, H, W, 3) frames of one video -> (``pixel_values_videos``, ``video_grid_thw`` (1, 3) int64).

        ``max_pixels`` lowers the per-frame pixel limit below the configured one (a token budget)."""
        rows, grid = self._patchify(frames, self.video_size(len(frames), frames.shape[1], frames.shape[2], max_pixels))
        return rows, np.asarray([grid], np.int64)

    def video_grid(self, num_frames: int, height: int, width: int, max_pixels: int | None = None) -> tuple[int, int, int]:
        """The grid (t, h, w) :meth:`video` gives for ``num_frames`` frames of height x width, without the pixels."""
        h, w = self.video_size(num_frames, height, width, max_pixels)
        return -(-num_frames // self.temporal_patch_size), h // self.patch_size, w // self.patch_size

    def video_size(self, num_frames: int, height: int, width: int, max_pixels: int | None = None) -> tuple[int, int]:
        """The (height, width) every frame of a video is resized to; ``max_pixels`` per frame as in :meth:`video`."""
        low, high = self.video_pixels
        return smart_resize(height, width, self.patch_size * self.merge_size, low,
                            high if max_pixels is None else min(high, max_pixels))

    def num_tokens(self, grid_thw) -> int:
        """Language-model tokens (placeholders) one image or video of this grid becomes."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.merge_size ** 2

    def _normalize(self, frame: np.ndarray, height: int, width: int) -> np.ndarray:
        if frame.shape[:2] != (height, width):
            frame = np.asarray(Image.fromarray(frame).resize((width, height), resample=self.resample))
        scaled = (frame.astype(np.float64) * self.rescale_factor).astype(np.float32)
        return ((scaled - self.mean) / self.std).transpose(2, 0, 1)

    def _patchify(self, frames: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int]]:
        p, tp, m = self.patch_size, self.temporal_patch_size, self.merge_size
        height, width = size
        stack = np.stack([self._normalize(np.ascontiguousarray(f), height, width) for f in frames])
        if len(stack) % tp:
            stack = np.concatenate([stack, np.repeat(stack[-1:], tp - len(stack) % tp, axis=0)])
        channels = stack.shape[1]
        gt, gh, gw = len(stack) // tp, height // p, width // p
        patches = stack.reshape(gt, tp, channels, gh // m, m, p, gw // m, m, p)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return patches.reshape(gt * gh * gw, channels * tp * p * p), (gt, gh, gw)
