"""Qwen3-VL vision transformer: Qwen2-VL's tower (``models.qwen2_vl.vision``) with a biased 16 px patch
embedding, learned position embeddings, LayerNorm blocks with a fc1/fc2 MLP, and DeepStack.

The learned embeddings form a square grid (``num_position_embeddings``); each (h, w) slice gets them
bilinearly resampled to its own grid (corners aligned, as transformers' ``F.interpolate`` reproduction),
added after the patch embedding. DeepStack: after each block in ``deepstack_visual_indexes`` the hidden
states also go through a merger of their own (normalised after the 2 x 2 concatenation), and the tower
returns those merged features after its tokens; the decoder adds them to its first layers' outputs.
Qwen3.5's tower (``Qwen3_5VisionModel``) is this one without DeepStack (its config has no
``deepstack_visual_indexes``): it returns the merged tokens alone.

Parameter names equal transformers' ``Qwen3VLVisionModel`` (and ``Qwen3_5VisionModel``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from mindspore import Tensor, nn

from models.layers import Embedding, LayerNorm, Linear, activation, gelu
from models.qwen2_vl.vision import PatchEmbed, VisionAttention, VisionBlock, VisionTower

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class VisionMlp(nn.Cell):
    def __init__(self, dim: int, hidden_dim: int, hidden_act: str):
        super().__init__()
        self.act = activation(hidden_act)
        self.linear_fc1 = Linear(dim, hidden_dim)
        self.linear_fc2 = Linear(hidden_dim, dim)

    def construct(self, x: Tensor) -> Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class PatchMerger(nn.Cell):
    """LayerNorm, each 2x2 group of consecutive rows concatenated, then an exact-GELU MLP to the LM width.
    DeepStack's mergers (``postshuffle``) normalise the concatenated rows instead."""

    def __init__(self, dim: int, context_dim: int, merge_size: int, postshuffle: bool):
        super().__init__()
        self.hidden_size = context_dim * merge_size ** 2
        self.postshuffle = postshuffle
        self.norm = LayerNorm(self.hidden_size if postshuffle else context_dim, eps=1e-6)
        self.linear_fc1 = Linear(self.hidden_size, self.hidden_size)
        self.linear_fc2 = Linear(self.hidden_size, dim)

    def construct(self, x: Tensor) -> Tensor:
        if self.postshuffle:
            x = self.norm(x.reshape(-1, self.hidden_size))
        else:
            x = self.norm(x).reshape(-1, self.hidden_size)
        return self.linear_fc2(gelu(self.linear_fc1(x)))


def position_interpolation(h: int, w: int, merge: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the (side x side) position table and their bilinear weights, (h*w, 4) each, for an (h, w)
    patch grid in merger order (corners aligned: the grid's first and last patches take the table's)."""
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w)).reshape(h // merge, merge, w // merge, merge)
    cols = np.broadcast_to(np.arange(w)[None, :], (h, w)).reshape(h // merge, merge, w // merge, merge)
    rows, cols = rows.transpose(0, 2, 1, 3).reshape(-1), cols.transpose(0, 2, 1, 3).reshape(-1)

    def taps(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(src)
        frac = (src - floor).astype(np.float32)
        low = floor.astype(np.int64)
        return np.stack([low, np.minimum(low + 1, side - 1)], 1), np.stack([1 - frac, frac], 1)

    h_taps, h_weights = taps(rows, h)
    w_taps, w_weights = taps(cols, w)
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return index.astype(np.int32), weights.astype(np.float32)


class Qwen3VisionTransformer(VisionTower):
    """``pixel_values`` rows + ``grid_thw`` -> (tokens, *DeepStack features), each (sum of t*h*w/4,
    ``out_hidden_size``) in input order."""

    jit_name = "qwen3_vl.vision"

    def __init__(self, config: "PretrainedConfig", max_blocks: int = 8):
        super().__init__(config, config.hidden_size, max_blocks)
        dim, merge = config.hidden_size, config.spatial_merge_size
        self.patch_embed = PatchEmbed(config, dim, bias=True)
        self.pos_embed = Embedding(config.num_position_embeddings, dim)
        self.side = int(config.num_position_embeddings ** 0.5)
        self.blocks = nn.CellList([
            VisionBlock(VisionAttention(dim, config.num_heads),
                        VisionMlp(dim, config.intermediate_size, config.hidden_act),
                        LayerNorm(dim, eps=1e-6), LayerNorm(dim, eps=1e-6))
            for _ in range(config.depth)])
        self.merger = PatchMerger(config.out_hidden_size, dim, merge, postshuffle=False)
        indexes = list(getattr(config, "deepstack_visual_indexes", None) or ())  # none in Qwen3.5's tower
        self.deepstack_merger_list = nn.CellList([PatchMerger(config.out_hidden_size, dim, merge, postshuffle=True)
                                                  for _ in indexes])
        # per block: the DeepStack merger its output goes through, or -1
        self.deepstack_merger_of = tuple(indexes.index(i) if i in indexes else -1 for i in range(config.depth))

    def slice_inputs(self, h: int, w: int, order: np.ndarray) -> tuple:
        """The slice's interpolated position embeddings (h*w, D)."""
        index, weights = position_interpolation(h, w, self.merge_size, self.side)
        table = self.pos_embed(Tensor(index[order].reshape(-1))).reshape(h * w, 4, -1)
        return ((table * Tensor(weights[order])[:, :, None].astype(table.dtype)).sum(1),)

    def encode_blocks(self, rows: Tensor, cos: Tensor, sin: Tensor, pos_embeds: Tensor) -> tuple:
        """(n*h*w, K) patch rows of n blocks -> the merged tokens and DeepStack features, (n*h*w/4, LM hidden) each."""
        x = self.patch_embed(rows)
        x = x.reshape(-1, cos.shape[0], x.shape[-1]) + pos_embeds
        deepstack = ()
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin)
            if self.deepstack_merger_of[i] >= 0:
                deepstack += (self.deepstack_merger_list[self.deepstack_merger_of[i]](x),)
        return (self.merger(x),) + deepstack
