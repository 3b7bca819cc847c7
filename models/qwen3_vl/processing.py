"""Qwen3-VL image and video preprocessing: Qwen2-VL's (``models.qwen2_vl.processing``) with Qwen3-VL's
settings, its video resize rule, a per-frame token range, and frame timestamps in the prompt.

- Pixels: 16 px patches (a language-model token covers 32 x 32 px after the 2 x 2 merge), temporal
  patch 2, mean and std 0.5 (the published ``preprocessor_config.json``; the checkpoint's own values
  win). Images are resized as Qwen2-VL's (transformers maps Qwen3-VL's images to the same processor).
- Video size (:meth:`Qwen3VLVisionProcessor.video_size`): qwen-vl-utils' rule (NeMo Curator's too),
  128 to 768 tokens per temporal patch and about ``longest_edge`` (published: 24,576 tokens) for the
  whole video, through transformers 5.25's Qwen3-VL resize, which bounds all frames together. It equals
  ``Qwen3VLVideoProcessor`` with ``cap_pixels_per_frame=True``, ``max_video_tokens`` the per-frame top,
  ``size = {"shortest_edge": per-frame floor in pixels, "longest_edge": 2 x longest_edge}`` (its cap
  divides the total by frames, qwen-vl-utils by temporal patches). The config's video ``shortest_edge``
  (published: 4,096 px) is not used: the per-frame floor is the rule's 128 tokens, which a token
  budget may not go below either (:meth:`Qwen3VLVisionProcessor.least_tokens`).
- Timestamps (:func:`video_prompt_ids`): each temporal patch is written ``<{t:.1f} seconds>`` +
  ``<|vision_start|>`` + its tokens + ``<|vision_end|>``, t the mean time of the patch's first and
  last frame (the last frame repeated to fill the final patch), and the chat template's
  ``<|vision_start|><|video_pad|><|vision_end|>`` wrapper collapses into those groups, as
  transformers 5.25's ``Qwen3VLProcessor`` writes a video.
"""
from __future__ import annotations

import numpy as np

from models.qwen2_vl.processing import Qwen2VLVisionProcessor, smart_resize

IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)
UNIT = 32 * 32  # pixels per language-model token (16 px patches, 2 x 2 merge)
IMAGE_PIXELS = (65536, 16777216)  # Qwen3-VL's published preprocessor_config.json size
VIDEO_PIXELS = (4096, 24576 * UNIT)  # its video_preprocessor_config.json size: about 24,576 tokens a video
FRAME_TOKENS = (128, 768)  # qwen-vl-utils' VIDEO_MIN_TOKEN_NUM, VIDEO_MAX_TOKEN_NUM per temporal patch

VIDEO_PAD = "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


class Qwen3VLVisionProcessor(Qwen2VLVisionProcessor):
    """Frames -> ``pixel_values`` rows and grids; ``frame_tokens``: the (fewest, most) tokens a temporal
    patch of a video gets before a token budget applies."""

    defaults = {"patch_size": 16, "mean": IMAGE_MEAN, "std": IMAGE_STD, "image_pixels": IMAGE_PIXELS,
                "video_pixels": VIDEO_PIXELS}

    def __init__(self, frame_tokens: tuple[int, int] = FRAME_TOKENS, **settings):
        super().__init__(**{**self.defaults, **settings})
        if not 0 < frame_tokens[0] <= frame_tokens[1]:
            raise ValueError(f"per-frame tokens must be a range of positive counts, got {frame_tokens}")
        self.frame_tokens = tuple(frame_tokens)

    def video_size(self, num_frames: int, height: int, width: int, max_pixels: int | None = None) -> tuple[int, int]:
        """The frame size of a video of ``num_frames`` frames (see the module docstring); ``max_pixels`` lowers
        the per-frame limit further (a token budget). One frame is sized as the temporal patch it fills."""
        tp = self.temporal_patch_size
        unit = (self.patch_size * self.merge_size) ** 2
        count = max(num_frames, tp)
        low, high = (tokens * unit for tokens in self.frame_tokens)
        per_frame = max(min(high, self.video_pixels[1] * tp // count), int(low * 1.05))
        if max_pixels is not None:
            per_frame = min(per_frame, max_pixels)
        return smart_resize(height, width, self.patch_size * self.merge_size, low, per_frame * count, count, tp)

    def least_tokens(self, num_frames: int, height: int, width: int) -> int:
        """The fewest tokens a token budget may leave a video of ``num_frames`` frames: qwen-vl-utils keeps every
        temporal patch at its floor (``frame_tokens[0]``) or more, unless the frames themselves are smaller."""
        t, h, w = self.video_grid(num_frames, height, width)
        return t * min(h * w // self.merge_size ** 2, self.frame_tokens[0])


def patch_times(frame_times: np.ndarray, temporal_patch_size: int = 2) -> np.ndarray:
    """Each temporal patch's time: the mean of its first and last frame's (seconds), the last frame
    repeated to fill the final patch."""
    times = np.asarray(frame_times, np.float64)
    times = np.concatenate([times, np.repeat(times[-1:], -len(times) % temporal_patch_size)])
    groups = times.reshape(-1, temporal_patch_size)
    return (groups[:, 0] + groups[:, -1]) / 2


def video_prompt_ids(tokenizer, text: str, times: np.ndarray, tokens_per_patch: int, video_token_id: int) -> list[int]:
    """Token ids of a prompt ``text`` holding one video (its ``<|video_pad|>``, with or without the chat
    template's vision start/end around it), written as Qwen3-VL writes a video: per temporal patch (its
    time in ``times``) a timestamp and ``tokens_per_patch`` pads between vision start and end.

    The text is tokenised with one pad per patch, then each pad becomes ``tokens_per_patch``: the pad is a
    special token, so this equals tokenising the expanded text."""
    text = text.replace(VISION_START + VIDEO_PAD + VISION_END, VIDEO_PAD)
    if text.count(VIDEO_PAD) != 1:
        raise ValueError(f"a prompt must hold one {VIDEO_PAD} for the video, got {text!r}")
    groups = "".join(f"<{t:.1f} seconds>{VISION_START}{VIDEO_PAD}{VISION_END}" for t in times)
    ids = tokenizer(text.replace(VIDEO_PAD, groups))["input_ids"]
    return [i for tok in ids for i in ([tok] * tokens_per_patch if tok == video_token_id else [tok])]
