"""Qwen2.5-VL vision transformer: Qwen2-VL's tower (``models.qwen2_vl.vision``) with RMSNorm blocks,
a gated SiLU MLP with biases, an RMSNorm merger, and window attention.

Windows are ``window_size`` pixels across (112 in the published configs: 4 x 4 merged patches of
2 x 2 patches of 14 px), tiled over each temporal slice from its top-left corner, so windows at the
right and bottom edges are smaller when the merged grid does not divide evenly. The slice's rows
are put in window order before the blocks (as transformers' ``get_window_index`` orders them) and
restored after the merger. Blocks listed in ``fullatt_block_indexes`` attend over the whole slice;
the others attend inside each window, the windows padded to full length and stacked as batch rows
(with a key mask when some are short), which keeps every shape static.

Parameter names equal transformers' ``Qwen2_5_VisionTransformerPretrainedModel``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from mindspore import Tensor, nn

from models.layers import Linear, RMSNorm
from models.qwen2_vl.vision import (PatchEmbed, PatchMerger, VisionAttention, VisionBlock, VisionTower,
                                    WindowLayout, activation)

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class GatedMlp(nn.Cell):
    """down(act(gate(x)) * up(x)), every projection with a bias."""

    def __init__(self, dim: int, hidden_dim: int, hidden_act: str):
        super().__init__()
        self.act = activation(hidden_act)
        self.gate_proj = Linear(dim, hidden_dim)
        self.up_proj = Linear(dim, hidden_dim)
        self.down_proj = Linear(hidden_dim, dim)

    def construct(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def window_layout(h: int, w: int, merge: int, window: int) -> WindowLayout:
    """The :class:`WindowLayout` of an (h, w) patch grid with windows of ``window`` merged patches across."""
    gh, gw = h // merge, w // merge
    unit = merge * merge  # patch rows per merged patch (consecutive in the processor's order)
    groups = []
    for top in range(0, gh, window):
        for left in range(0, gw, window):
            rows = np.arange(top, min(top + window, gh))[:, None] * gw
            groups.append((rows + np.arange(left, min(left + window, gw))[None, :]).reshape(-1))
    units = np.concatenate(groups)
    order = (units[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
    lengths = np.array([len(g) * unit for g in groups])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    full = window * window * unit
    offsets = np.arange(full)[None, :]
    gather = (starts[:, None] + np.minimum(offsets, lengths[:, None] - 1)).reshape(-1)
    keep = offsets < lengths[:, None]
    scatter = np.concatenate([k * full + np.arange(n) for k, n in enumerate(lengths)])
    return WindowLayout(order=order, restore=np.argsort(units), gather=gather,
                        key_mask=None if keep.all() else keep, scatter=scatter)


class Qwen2_5_VisionTransformer(VisionTower):
    """``pixel_values`` rows + ``grid_thw`` -> (sum of t*h*w/4, ``out_hidden_size``) tokens in input order."""

    jit_name = "qwen2_5_vl.vision"

    def __init__(self, config: "PretrainedConfig", max_blocks: int = 8):
        super().__init__(config, config.hidden_size, max_blocks)
        dim, merge = config.hidden_size, config.spatial_merge_size
        self.window = config.window_size // merge // config.patch_size
        if self.window < 1:
            raise ValueError(f"window_size {config.window_size} is smaller than one merged patch")
        length = (self.window * merge) ** 2
        full = set(config.fullatt_block_indexes)
        self.patch_embed = PatchEmbed(config, dim)
        self.blocks = nn.CellList([
            VisionBlock(VisionAttention(dim, config.num_heads, None if i in full else length),
                        GatedMlp(dim, config.intermediate_size, config.hidden_act),
                        RMSNorm(dim, eps=1e-6), RMSNorm(dim, eps=1e-6))
            for i in range(config.depth)])
        self.merger = PatchMerger(config.out_hidden_size, dim, merge, norm=RMSNorm)

    def window_layout(self, h: int, w: int) -> WindowLayout:
        return window_layout(h, w, self.merge_size, self.window)
