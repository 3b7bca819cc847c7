"""Qwen2-VL vision transformer: 3-D patch embedding, 2-D rotary ViT blocks, 2x2 patch merger.

Attention in Qwen2-VL's vision tower never crosses a temporal slice: transformers builds
``cu_seqlens`` with one block per (image or video, temporal patch) of ``grid_h * grid_w``
patches. So a block is a natural batch row: blocks of the same (h, w) are stacked into
(n_blocks, h*w, D) and run together in chunks of a power of two blocks (at most ``max_blocks``,
fewer for large frames: ``chunk_limit`` bounds the memory a compiled chunk holds), the last one zero-padded: static shapes, so ``ms.jit`` compiles a few
graphs per frame size instead of one per video length.

:class:`VisionTower` is that machinery (grouping, chunking, compiling, the 2-D rotary), shared
with Qwen2.5-VL (``models.qwen2_5_vl.vision``), whose blocks differ and whose towers may
attend within windows (see :class:`WindowLayout`). Parameter names equal transformers'
``Qwen2VisionTransformerPretrainedModel``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from models import attention as attn, jit
from models.layers import LayerNorm, Linear, activation, apply_rotary, gelu, zeros_parameter

if TYPE_CHECKING:
    from transformers import PretrainedConfig


SCORE_LIMIT = 1 << 24  # attention scores per compiled chunk (64 MB in float32): compiled graphs keep them all


class GELU(nn.Cell):
    def construct(self, x: Tensor) -> Tensor:
        return gelu(x)


class PatchProjection(nn.Cell):
    """Conv3d with kernel == stride, i.e. one matrix product per flattened patch row (a bias in Qwen3-VL)."""

    def __init__(self, in_channels: int, temporal_patch: int, patch: int, embed_dim: int, bias: bool = False):
        super().__init__()
        self.weight = zeros_parameter((embed_dim, in_channels, temporal_patch, patch, patch))
        self.bias = zeros_parameter((embed_dim,)) if bias else None
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, rows: Tensor) -> Tensor:
        weight = self.weight.reshape(self.weight.shape[0], -1)
        out = self.matmul(rows.astype(weight.dtype), weight)
        return out if self.bias is None else out + self.bias


class PatchEmbed(nn.Cell):
    def __init__(self, config: "PretrainedConfig", embed_dim: int, bias: bool = False):
        super().__init__()
        self.proj = PatchProjection(config.in_channels, config.temporal_patch_size, config.patch_size, embed_dim,
                                    bias)

    def construct(self, rows: Tensor) -> Tensor:
        return self.proj(rows)


class VisionAttention(nn.Cell):
    """Self-attention over each row of (n, S, D), 2-D rotary on q and k (float32). Dense on CPU, where
    the chunking in :meth:`VisionTower.chunk_limit` bounds its memory; the fused kernel on Ascend.

    With ``window`` set, each row is S / window consecutive windows of ``window`` tokens attending
    only among themselves (they become batch rows), ``key_mask`` (windows, window) marking real tokens.
    """

    def __init__(self, dim: int, num_heads: int, window: Optional[int] = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.window = window
        self.qkv = Linear(dim, dim * 3)
        self.proj = Linear(dim, dim)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        n, s, dim = x.shape
        qkv = self.qkv(x).reshape(n, s, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        q = apply_rotary(q.astype(ms.float32), cos, sin).astype(x.dtype)
        k = apply_rotary(k.astype(ms.float32), cos, sin).astype(x.dtype)
        rows, length = n, s
        if self.window is not None:
            rows, length = n * (s // self.window), self.window
            q, k, v = (t.reshape(rows, length, self.num_heads, self.head_dim) for t in (q, k, v))
            if key_mask is not None:
                key_mask = ops.tile(key_mask, (n, 1))
        out = attn.attention(q.swapaxes(1, 2) * self.scaling, k.swapaxes(1, 2), v.swapaxes(1, 2), key_mask,
                             tiles=False)
        return self.proj(out.reshape(n, s, dim))


class VisionMlp(nn.Cell):
    def __init__(self, dim: int, hidden_dim: int, hidden_act: str):
        super().__init__()
        self.act = activation(hidden_act)
        self.fc1 = Linear(dim, hidden_dim)
        self.fc2 = Linear(hidden_dim, dim)

    def construct(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Cell):
    """Pre-norm ViT block. A block whose attention has a ``window`` (Qwen2.5-VL) attends within the
    windows of :class:`WindowLayout`: it gathers the padded windows (``gather``, with their own
    ``window_cos``/``window_sin``) and scatters the result back (``scatter``)."""

    def __init__(self, attention: VisionAttention, mlp: nn.Cell, norm1: nn.Cell, norm2: nn.Cell):
        super().__init__()
        self.norm1 = norm1
        self.norm2 = norm2
        self.attn = attention
        self.mlp = mlp

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, gather: Optional[Tensor] = None,
                  key_mask: Optional[Tensor] = None, scatter: Optional[Tensor] = None,
                  window_cos: Optional[Tensor] = None, window_sin: Optional[Tensor] = None) -> Tensor:
        if self.attn.window is None:
            x = x + self.attn(self.norm1(x), cos, sin)
        else:
            padded = ops.gather(self.norm1(x), gather, 1)
            x = x + ops.gather(self.attn(padded, window_cos, window_sin, key_mask), scatter, 1)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Cell):
    """Norm (LayerNorm in Qwen2-VL, RMSNorm in Qwen2.5-VL), then each 2x2 group of consecutive rows
    concatenated -> MLP to the LM width."""

    def __init__(self, dim: int, context_dim: int, merge_size: int, norm: type = LayerNorm):
        super().__init__()
        self.hidden_size = context_dim * merge_size ** 2
        self.ln_q = norm(context_dim, eps=1e-6)
        self.mlp = nn.SequentialCell([Linear(self.hidden_size, self.hidden_size), GELU(),
                                      Linear(self.hidden_size, dim)])

    def construct(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.hidden_size))


@dataclass
class WindowLayout:
    """How one (h, w) temporal slice is laid out for window attention (Qwen2.5-VL).

    ``order`` puts the slice's patch rows in window order (windows of merged patches row by row,
    merged patches row by row inside each); the blocks run on that order and ``restore`` puts the
    merger's outputs back. ``gather`` (windows * window) picks each window's rows, padded to the
    full window length by repeating a row, ``key_mask`` (windows, window) hides that padding (None
    when every window is full) and ``scatter`` (h*w) takes each row back from the padded layout.
    """

    order: np.ndarray
    restore: np.ndarray
    gather: np.ndarray
    key_mask: Optional[np.ndarray]
    scatter: np.ndarray


class VisionTower(nn.Cell):
    """``pixel_values`` rows + ``grid_thw`` -> (sum of t*h*w/4, LM hidden) tokens in input order.

    Subclasses build ``patch_embed``, ``blocks`` and ``merger``; a subclass whose blocks use windows
    returns a :class:`WindowLayout` from :meth:`window_layout`, one that needs more per-slice inputs
    (Qwen3-VL's position embeddings) returns them from :meth:`slice_inputs`. An ``encode_blocks`` that
    returns a tuple (Qwen3-VL's DeepStack features after the tokens) makes the tower return a tuple.
    """

    jit_name = "qwen2_vl.vision"

    def __init__(self, config: "PretrainedConfig", embed_dim: int, max_blocks: int):
        super().__init__()
        self.config = config
        self.merge_size = config.spatial_merge_size
        self.max_blocks = max_blocks
        self.use_jit = True
        rot_dim = embed_dim // config.num_heads // 2
        exponents = np.arange(0, rot_dim, 2, dtype=np.float32) / np.float32(rot_dim)
        # later transformers 5 releases state the vision rotary base in rope_parameters (5.2 does not); it is 10000 in every Qwen-VL
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        self.inv_freq = 1.0 / (np.float32(theta) ** exponents)
        self._encode_jit = None

    def window_layout(self, h: int, w: int) -> Optional[WindowLayout]:
        """None: every block attends over the whole temporal slice."""
        return None

    def slice_inputs(self, h: int, w: int, order: np.ndarray) -> tuple:
        """Tensors ``encode_blocks`` takes after the window ones for an (h, w) slice whose rows are in ``order``."""
        return ()

    def chunk_limit(self, patches: int) -> int:
        """Blocks encoded together: at most ``max_blocks``, and a power of two whose attention scores
        (blocks x heads x patches x patches) stay under SCORE_LIMIT floats where one block allows."""
        per_block = self.config.num_heads * patches * patches
        fits = max(1, SCORE_LIMIT // per_block)
        return min(self.max_blocks, 1 << (fits.bit_length() - 1))

    def rotary(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin (h*w, head_dim) of the 2-D (row, column) rotary for one block, in merger order."""
        m = self.merge_size
        rows = np.broadcast_to(np.arange(h)[:, None], (h, w)).reshape(h // m, m, w // m, m)
        cols = np.broadcast_to(np.arange(w)[None, :], (h, w)).reshape(h // m, m, w // m, m)
        rows, cols = rows.transpose(0, 2, 1, 3).reshape(-1), cols.transpose(0, 2, 1, 3).reshape(-1)
        freqs = np.outer(np.arange(max(h, w), dtype=np.float32), self.inv_freq).astype(np.float32)
        half = np.concatenate([freqs[rows], freqs[cols]], axis=-1)
        emb = np.concatenate([half, half], axis=-1)
        return np.cos(emb), np.sin(emb)

    def encode_blocks(self, rows: Tensor, cos: Tensor, sin: Tensor, gather: Optional[Tensor] = None,
                      key_mask: Optional[Tensor] = None, scatter: Optional[Tensor] = None,
                      window_cos: Optional[Tensor] = None, window_sin: Optional[Tensor] = None,
                      restore: Optional[Tensor] = None) -> Tensor:
        """(n*h*w, K) patch rows of n blocks -> (n*h*w/4, LM hidden); the window tensors as
        :class:`WindowLayout` describes them, with the padded windows' cos/sin (flat arguments: a
        compiled graph takes tensors inside a tuple for constants)."""
        x = self.patch_embed(rows)
        x = x.reshape(-1, cos.shape[0], x.shape[-1])
        for block in self.blocks:
            x = block(x, cos, sin, gather, key_mask, scatter, window_cos, window_sin)
        x = self.merger(x)
        if restore is not None:
            n = rows.shape[0] // cos.shape[0]
            x = ops.gather(x.reshape(n, restore.shape[0], x.shape[-1]), restore, 1).reshape(-1, x.shape[-1])
        return x

    def _encoder(self):
        if not self.use_jit:
            return self.encode_blocks
        if self._encode_jit is None:
            self._encode_jit = ms.jit(self.encode_blocks)

        def encode(*args):
            return jit.call(self.jit_name, self._encode_jit, *args)
        return encode

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
        encode = self._encoder()
        dtype = self.patch_embed.proj.weight.dtype
        outputs: list = [None] * len(blocks)
        for h, w in sorted({(h, w) for _, h, w in blocks}):
            members = [i for i, b in enumerate(blocks) if b[1:] == (h, w)]
            size = min(self.chunk_limit(h * w), 1 << (len(members) - 1).bit_length())  # few distinct shapes
            cos, sin = self.rotary(h, w)
            layout = self.window_layout(h, w)
            order = np.arange(h * w) if layout is None else layout.order
            extra: tuple = ()
            if layout is not None:
                mask = None if layout.key_mask is None else Tensor(layout.key_mask.astype(np.int32))
                extra = (Tensor(layout.gather.astype(np.int32)), mask, Tensor(layout.scatter.astype(np.int32)),
                         Tensor(cos[order][layout.gather]), Tensor(sin[order][layout.gather]),
                         Tensor(layout.restore.astype(np.int32)))
            extra += self.slice_inputs(h, w, order)
            cos, sin = Tensor(cos[order]), Tensor(sin[order])
            for first in range(0, len(members), size):
                chunk = members[first:first + size]
                rows = np.zeros((size * h * w, pixel_values.shape[1]), np.float32)
                for j, i in enumerate(chunk):
                    rows[j * h * w:(j + 1) * h * w] = pixel_values[blocks[i][0] + order]
                out = encode(Tensor(rows).astype(dtype), cos, sin, *extra)
                out = out if isinstance(out, tuple) else (out,)
                per_block = h * w // self.merge_size ** 2
                for j, i in enumerate(chunk):
                    outputs[i] = [o[j * per_block:(j + 1) * per_block] for o in out]
        merged = tuple(ops.concat([o[k] for o in outputs], axis=0) for k in range(len(outputs[0])))
        return merged if len(merged) > 1 else merged[0]


class Qwen2VisionTransformer(VisionTower):
    """Qwen2-VL's tower: LayerNorm blocks with a fc1/fc2 MLP, full attention in every block."""

    def __init__(self, config: "PretrainedConfig", max_blocks: int = 8):
        super().__init__(config, config.embed_dim, max_blocks)
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config, dim)
        self.blocks = nn.CellList([
            VisionBlock(VisionAttention(dim, config.num_heads), VisionMlp(dim, int(dim * config.mlp_ratio),
                                                                          config.hidden_act),
                        LayerNorm(dim, eps=1e-6), LayerNorm(dim, eps=1e-6))
            for _ in range(config.depth)])
        self.merger = PatchMerger(config.hidden_size, dim, config.spatial_merge_size)
