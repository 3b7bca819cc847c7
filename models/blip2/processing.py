"""BLIP-2 frame preprocessing, equal to transformers' BlipImageProcessor.

Each frame is resized to the checkpoint's square size with PIL bicubic, scaled to
[0, 1] and normalised with the checkpoint's mean and std; values come from the
folder's ``preprocessor_config.json`` when it has one.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Blip2FrameProcessor:
    def __init__(self, height: int = 224, width: int = 224, mean=CLIP_MEAN, std=CLIP_STD,
                 resample: int = Image.BICUBIC, rescale_factor: float = 1 / 255):
        self.size = (height, width)
        self.mean = np.asarray(mean, np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, np.float32).reshape(1, 1, 3)
        self.resample = resample
        self.rescale_factor = rescale_factor

    @classmethod
    def from_pretrained(cls, folder: str | Path, image_size: int | None = None) -> "Blip2FrameProcessor":
        """Read ``preprocessor_config.json`` if present; else CLIP statistics at ``image_size`` (224)."""
        path = Path(folder) / "preprocessor_config.json"
        cfg = json.loads(path.read_text()) if path.is_file() else {}
        size = cfg.get("size", {})
        height = size.get("height", size.get("shortest_edge", image_size or 224))
        width = size.get("width", size.get("shortest_edge", image_size or 224))
        return cls(height=height, width=width, mean=cfg.get("image_mean", CLIP_MEAN),
                   std=cfg.get("image_std", CLIP_STD), resample=cfg.get("resample", Image.BICUBIC),
                   rescale_factor=cfg.get("rescale_factor", 1 / 255))

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """(T, H, W, 3) uint8 RGB -> (T, 3, height, width) float32."""
        height, width = self.size
        out = np.empty((len(frames), 3, height, width), np.float32)
        for i, frame in enumerate(frames):
            resized = np.asarray(Image.fromarray(frame).resize((width, height), resample=self.resample))
            scaled = (resized.astype(np.float64) * self.rescale_factor).astype(np.float32)
            out[i] = ((scaled - self.mean) / self.std).transpose(2, 0, 1)
        return out
