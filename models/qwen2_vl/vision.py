"""Qwen2-VL vision transformer: 3-D patch embedding, 2-D rotary ViT blocks, 2x2 patch merger.

Attention in Qwen2-VL's vision tower never crosses a temporal slice: transformers builds
``cu_seqlens`` with one block per (image or video, temporal patch) of ``grid_h * grid_w``
patches. So a block is a natural batch row: blocks of the same (h, w) are stacked into
(n_blocks, h*w, D) and run together in chunks of a power of two blocks (at most ``max_blocks``,
fewer for large frames: ``chunk_limit`` bounds the memory a compiled chunk holds), the last one zero-padded: static shapes, so ``ms.jit`` compiles a few
graphs per frame size instead of one per video length.

Parameter names equal transformers' ``Qwen2VisionTransformerPretrainedModel``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from models import attention as attn, jit
from models.layers import LayerNorm, Linear, zeros_parameter
from models.llama import rotate_half

if TYPE_CHECKING:
    from transformers import PretrainedConfig


SCORE_LIMIT = 1 << 24  # attention scores per compiled chunk (64 MB in float32): compiled graphs keep them all


def quick_gelu(x: Tensor) -> Tensor:
    return x * ops.sigmoid(1.702 * x)


def gelu(x: Tensor) -> Tensor:
    """Exact (erf) GELU, as torch.nn.GELU()."""
    return 0.5 * x * (1.0 + ops.erf(x * 0.7071067811865476))


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu, "silu": ops.silu}


class GELU(nn.Cell):
    def construct(self, x: Tensor) -> Tensor:
        return gelu(x)


class PatchProjection(nn.Cell):
    """Conv3d with kernel == stride and no bias, i.e. one matrix product per flattened patch row."""

    def __init__(self, in_channels: int, temporal_patch: int, patch: int, embed_dim: int):
        super().__init__()
        self.weight = zeros_parameter((embed_dim, in_channels, temporal_patch, patch, patch))
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, rows: Tensor) -> Tensor:
        weight = self.weight.reshape(self.weight.shape[0], -1)
        return self.matmul(rows.astype(weight.dtype), weight)


class PatchEmbed(nn.Cell):
    def __init__(self, config: "PretrainedConfig"):
        super().__init__()
        self.proj = PatchProjection(config.in_channels, config.temporal_patch_size, config.patch_size,
                                    config.embed_dim)

    def construct(self, rows: Tensor) -> Tensor:
        return self.proj(rows)


class VisionAttention(nn.Cell):
    """Full self-attention inside each block, 2-D rotary on q and k (float32). Dense on CPU, where the
    chunking in :meth:`Qwen2VisionTransformer.chunk_limit` bounds its memory; the fused kernel on Ascend."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.qkv = Linear(dim, dim * 3)
        self.proj = Linear(dim, dim)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        n, s, dim = x.shape
        qkv = self.qkv(x).reshape(n, s, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        cos, sin = cos[:, None, :], sin[:, None, :]
        q32, k32 = q.astype(ms.float32), k.astype(ms.float32)
        q = (q32 * cos + rotate_half(q32) * sin).astype(x.dtype).swapaxes(1, 2)
        k = (k32 * cos + rotate_half(k32) * sin).astype(x.dtype).swapaxes(1, 2)
        return self.proj(attn.attention(q * self.scaling, k, v.swapaxes(1, 2), tiles=False))


class VisionMlp(nn.Cell):
    def __init__(self, dim: int, hidden_dim: int, hidden_act: str):
        super().__init__()
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported vision hidden_act {hidden_act!r}; supported: {sorted(ACTIVATIONS)}")
        self.fc1 = Linear(dim, hidden_dim)
        self.fc2 = Linear(hidden_dim, dim)
        self.act = ACTIVATIONS[hidden_act]

    def construct(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Cell):
    def __init__(self, config: "PretrainedConfig"):
        super().__init__()
        dim = config.embed_dim
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, config.num_heads)
        self.mlp = VisionMlp(dim, int(dim * config.mlp_ratio), config.hidden_act)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Cell):
    """LayerNorm, then each 2x2 group of consecutive rows concatenated -> MLP to the LM width."""

    def __init__(self, dim: int, context_dim: int, merge_size: int):
        super().__init__()
        self.hidden_size = context_dim * merge_size ** 2
        self.ln_q = LayerNorm(context_dim, eps=1e-6)
        self.mlp = nn.SequentialCell([Linear(self.hidden_size, self.hidden_size), GELU(),
                                      Linear(self.hidden_size, dim)])

    def construct(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.hidden_size))


class Qwen2VisionTransformer(nn.Cell):
    """``pixel_values`` rows + ``grid_thw`` -> (sum of t*h*w/4, LM hidden) tokens in input order."""

    def __init__(self, config: "PretrainedConfig", max_blocks: int = 8):
        super().__init__()
        self.config = config
        self.merge_size = config.spatial_merge_size
        self.max_blocks = max_blocks
        self.use_jit = True
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.CellList([VisionBlock(config) for _ in range(config.depth)])
        self.merger = PatchMerger(config.hidden_size, config.embed_dim, config.spatial_merge_size)
        head_dim = config.embed_dim // config.num_heads
        rot_dim = head_dim // 2
        exponents = np.arange(0, rot_dim, 2, dtype=np.float32) / np.float32(rot_dim)
        self.inv_freq = 1.0 / (np.float32(10000.0) ** exponents)
        self._encode_jit = None

    def chunk_limit(self, patches: int) -> int:
        """Blocks encoded together: at most ``max_blocks``, and a power of two whose attention scores
        (blocks x heads x patches x patches) stay under SCORE_LIMIT floats where one block allows."""
        per_block = self.config.num_heads * patches * patches
        fits = max(1, SCORE_LIMIT // per_block)
        return min(self.max_blocks, 1 << (fits.bit_length() - 1))

    def rotary(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        """cos/sin (h*w, head_dim) of the 2-D (row, column) rotary for one block, in merger order."""
        m = self.merge_size
        rows = np.broadcast_to(np.arange(h)[:, None], (h, w)).reshape(h // m, m, w // m, m)
        cols = np.broadcast_to(np.arange(w)[None, :], (h, w)).reshape(h // m, m, w // m, m)
        rows, cols = rows.transpose(0, 2, 1, 3).reshape(-1), cols.transpose(0, 2, 1, 3).reshape(-1)
        freqs = np.outer(np.arange(max(h, w), dtype=np.float32), self.inv_freq).astype(np.float32)
        half = np.concatenate([freqs[rows], freqs[cols]], axis=-1)
        emb = np.concatenate([half, half], axis=-1)
        return Tensor(np.cos(emb)), Tensor(np.sin(emb))

    def encode_blocks(self, rows: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """(n*h*w, K) patch rows of n blocks -> (n*h*w/4, LM hidden)."""
        x = self.patch_embed(rows)
        x = x.reshape(-1, cos.shape[0], x.shape[-1])
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.merger(x)

    def construct(self, pixel_values, grid_thw) -> Tensor:
        pixel_values = pixel_values.asnumpy() if isinstance(pixel_values, Tensor) else np.asarray(pixel_values)
        grid = np.asarray(grid_thw.asnumpy() if isinstance(grid_thw, Tensor) else grid_thw).reshape(-1, 3)
        blocks: list[tuple[int, int, int]] = []  # (first row, h, w) of each attention block, in input order
        start = 0
        for t, h, w in grid.tolist():
            for _ in range(t):
                blocks.append((start, h, w))
                start += h * w
        if start != pixel_values.shape[0]:
            raise ValueError(f"grid_thw describes {start} patch rows, pixel_values has {pixel_values.shape[0]}")
        encode = self.encode_blocks
        if self.use_jit:
            if self._encode_jit is None:
                self._encode_jit = ms.jit(self.encode_blocks)

            def encode(*args):
                return jit.call("qwen2_vl.vision", self._encode_jit, *args)
        dtype = self.patch_embed.proj.weight.dtype
        outputs: list = [None] * len(blocks)
        for h, w in sorted({(h, w) for _, h, w in blocks}):
            members = [i for i, b in enumerate(blocks) if b[1:] == (h, w)]
            size = min(self.chunk_limit(h * w), 1 << (len(members) - 1).bit_length())  # few distinct shapes
            cos, sin = self.rotary(h, w)
            for first in range(0, len(members), size):
                chunk = members[first:first + size]
                rows = np.zeros((size * h * w, pixel_values.shape[1]), np.float32)
                for j, i in enumerate(chunk):
                    rows[j * h * w:(j + 1) * h * w] = pixel_values[blocks[i][0]:blocks[i][0] + h * w]
                out = encode(Tensor(rows).astype(dtype), cos, sin)
                per_block = h * w // self.merge_size ** 2
                for j, i in enumerate(chunk):
                    outputs[i] = out[j * per_block:(j + 1) * per_block]
        return ops.concat(outputs, axis=0)
