"""Qwen3-VL, dense (``Qwen/Qwen3-VL-{2B,4B,8B,32B}-*``) and MoE (``Qwen/Qwen3-VL-{30B-A3B,235B-A22B}-*``,
``model_type: qwen3_vl_moe``): Qwen2-VL's model with Qwen3-VL's vision tower, decoder and positions.

``models.qwen2_vl.modeling`` does the rest: placeholder filling, the position table generation decodes
with, tied embeddings, the checkpoint renames. Qwen3-VL's published checkpoints and transformers 5's
``save_pretrained`` use the nested layout (``model.visual.*``, ``model.language_model.*``, ``lm_head.*``);
the flat one (``visual.*``, ``model.*``) loads too. What differs:

- the vision tower (``models.qwen3_vl.vision``) also returns DeepStack features, which the decoder adds
  to the outputs of its first layers at the vision tokens (in the prompt only);
- the decoder is Qwen3's: no attention biases (``attention_bias``), per-head q/k RMSNorm, its own
  ``head_dim``, and interleaved M-RoPE;
- the MoE model's decoder layers have experts (``models.moe``) where its config says (``mlp_only_layers``,
  ``decoder_sparse_step``), and its expert tensors load from the published, transformers 5 and per-expert
  layouts (:func:`models.moe.adapt_expert_tensors`);
- positions (:func:`get_rope_index`): every run of vision tokens is its own item, and a video's temporal
  patches are separate runs (Qwen3-VL writes a timestamp and ``<|vision_start|>``/``<|vision_end|>``
  around each), so the time of a frame is carried by its text, not by its temporal position.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Optional

import numpy as np

from models.moe import expert_checkpoint_hook, num_experts
from models.qwen2_vl.modeling import Qwen2VLForConditionalGeneration
from models.qwen3_vl.vision import Qwen3VisionTransformer

if TYPE_CHECKING:
    from transformers import Qwen3VLConfig


def get_rope_index(config: "Qwen3VLConfig", input_ids: np.ndarray, attention_mask: Optional[np.ndarray] = None,
                   image_grid_thw: Optional[np.ndarray] = None,
                   video_grid_thw: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """3-D positions (3, B, L) and ``rope_deltas`` (B, 1: max position + 1 - padded length), as transformers 5.25.

    Each run of consecutive image (video) placeholders is one image (one temporal patch of a video:
    videos are split into t grids of (1, h, w)), taking the next grid in prompt order across the batch.
    Its tokens sit at (start, start + row, start + column) and the text after it continues at start +
    the longer merged side. Padding slots get position 1 (they are masked).
    """
    merge = config.vision_config.spatial_merge_size
    batch, length = input_ids.shape
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    kinds = np.select([input_ids == config.image_token_id, input_ids == config.video_token_id], [1, 2], 0)
    images = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    videos = np.zeros((0, 3), np.int64) if video_grid_thw is None else np.asarray(video_grid_thw).reshape(-1, 3)
    frames = [(1, h, w) for t, h, w in videos.tolist() for _ in range(t)]
    grids = {1: iter(images.tolist()), 2: iter(frames)}
    positions = np.ones((3, batch, length), np.int64)
    deltas = np.zeros((batch, 1), np.int64)
    for row in range(batch):
        keep = attention_mask[row] == 1
        parts: list[np.ndarray] = []
        start = 0
        for kind, run in itertools.groupby(kinds[row][keep].tolist()):
            count = len(list(run))
            if kind == 0:
                parts.append(np.broadcast_to(np.arange(count) + start, (3, count)))
                start += count
                continue
            name = "image" if kind == 1 else "video frame"
            grid = next(grids[kind], None)
            if grid is None:
                raise ValueError(f"more {name} placeholder runs than {name} grids")
            h, w = grid[1] // merge, grid[2] // merge
            if count != h * w:
                raise ValueError(f"a run of {count} {name} placeholders for a grid of {h * w} tokens (a video's "
                                 "temporal patches are separate runs in Qwen3-VL)")
            parts.append(np.stack([np.full(h * w, start), np.repeat(np.arange(h), w) + start,
                                   np.tile(np.arange(w), h) + start]))
            start += max(h, w)
        row_positions = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
        positions[:, row, keep] = row_positions
        deltas[row, 0] = (row_positions.max() + 1 if row_positions.size else 0) - length
    return positions, deltas


class Qwen3VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen3-VL (dense or MoE) with transformers' forward/generate arguments."""

    vision_class = Qwen3VisionTransformer
    decoder_options = {"qkv_bias": None, "o_bias": None, "qk_norm": True, "interleaved": True}

    def __init__(self, config):
        super().__init__(config)
        # an MoE prompt groups its tokens by expert on the host, so it runs op by op (see models.moe)
        self.compile_prompt = not num_experts(config.text_config)

    def checkpoint_hook(self, tensors: dict) -> None:
        expert_checkpoint_hook(self, tensors, self.config.text_config)

    def rope_index(self, input_ids: np.ndarray, attention_mask: np.ndarray, image_grid_thw, video_grid_thw,
                   second_per_grid_ts) -> tuple[np.ndarray, np.ndarray]:
        if second_per_grid_ts is not None:
            raise ValueError("Qwen3-VL has no second_per_grid_ts: a frame's time is the timestamp text before it")
        return get_rope_index(self.config, input_ids, attention_mask, image_grid_thw, video_grid_thw)
