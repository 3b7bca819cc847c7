"""Qwen2.5-VL image and video preprocessing: Qwen2-VL's (``models.qwen2_vl.processing``) plus time.

The pixels are prepared exactly as for Qwen2-VL: transformers maps ``qwen2_5_vl`` to the same
``Qwen2VLImageProcessor`` and ``Qwen2VLVideoProcessor``, and the published checkpoints'
``preprocessor_config.json`` holds the same patch 14, merge 2, temporal patch 2, CLIP mean/std
and pixel limits. What Qwen2.5-VL adds is ``second_per_grid_ts``: the seconds one temporal patch
spans, ``temporal_patch_size / fps`` of the sampled frames, as ``Qwen2_5_VLProcessor`` computes
it (its default fps is 2, the rate Qwen2.5-VL samples videos at).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from models.qwen2_vl.processing import Qwen2VLVisionProcessor

DEFAULT_FPS = 2.0  # Qwen2_5_VLProcessor's fps when it is not told one


def sampled_fps(frame_times: np.ndarray) -> Optional[float]:
    """Frames per second of sampled frames from their times (seconds, increasing); None for fewer than
    two distinct times. Evenly spread frames give their rate exactly; uneven ones their mean rate."""
    times = np.asarray(frame_times, np.float64)
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / float(times[-1] - times[0])


class Qwen2_5_VLVisionProcessor(Qwen2VLVisionProcessor):
    """Qwen2-VL's frames -> patch rows, and the time each temporal patch spans."""

    def second_per_grid(self, fps: Optional[float] = None) -> float:
        """``second_per_grid_ts`` of a video whose frames were sampled at ``fps`` (default: 2)."""
        rate = DEFAULT_FPS if fps is None else float(fps)
        if rate <= 0:
            raise ValueError(f"a video's sampled frame rate must be positive, got {fps}")
        return self.temporal_patch_size / rate
