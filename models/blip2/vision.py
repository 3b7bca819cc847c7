"""BLIP-2 vision encoder (EVA ViT-g/14 layout) with transformers' parameter names.

Parameter paths equal the keys of ``vision_model.*`` in the published
``Salesforce/blip2-*`` checkpoints, so weights load by name. The attention keeps
q, k and v in one ``qkv`` Linear whose bias is (q_bias, 0, v_bias): checkpoints
converted by transformers store it merged as ``qkv.bias``; LAVIS-style checkpoints
store ``q_bias``/``v_bias`` separately, which :func:`merge_q_v_bias` folds in.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Optional

import numpy as np
from mindspore import Tensor, nn, ops

from models.attention import attention
from models.checkpoint import TensorRef
from models.layers import LayerNorm, Linear, gelu, zeros_parameter

if TYPE_CHECKING:
    from transformers import Blip2VisionConfig


class Blip2PatchEmbedding(nn.Cell):
    """Conv2d with kernel = stride = patch size, computed as unfold + matmul.

    Keeps the torch Conv2d parameter layout (``weight`` (D, C, p, p), ``bias`` (D,)).
    Returns patch tokens (B, N, D) in row-major patch order like ``conv(x).flatten(2).T``.
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.weight = zeros_parameter((embed_dim, in_channels, patch_size, patch_size))
        self.bias = zeros_parameter((embed_dim,))
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, pixel_values: Tensor) -> Tensor:
        b, c, h, w = pixel_values.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        x = pixel_values.reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)
        x = x.reshape(b * gh * gw, c * p * p)
        y = self.matmul(x, self.weight.reshape(self.embed_dim, c * p * p)) + self.bias
        return y.reshape(b, gh * gw, self.embed_dim)


class Blip2VisionEmbeddings(nn.Cell):
    """Patch tokens with a class token in front, plus learned absolute positions.

    ``config.temporal_patch_size = k`` (a project extension, not in published checkpoints)
    makes each patch span k consecutive frames, as Qwen2-VL's and ViViT's tubelets do: the
    input has 3k channels (the k frames' RGB in time order) and the patch weight is
    (D, 3k, p, p), so one patch sees what moved where between its frames.
    """

    def __init__(self, config: "Blip2VisionConfig"):
        super().__init__()
        dim = config.hidden_size
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.class_embedding = zeros_parameter((1, 1, dim))
        channels = 3 * temporal_patch_size(config)
        self.patch_embedding = Blip2PatchEmbedding(channels, dim, config.patch_size)
        self.position_embedding = zeros_parameter((1, num_positions, dim))

    def construct(self, pixel_values: Tensor) -> Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.astype(dtype))
        cls = ops.broadcast_to(self.class_embedding.astype(dtype), (patches.shape[0], 1, patches.shape[2]))
        return ops.concat((cls, patches), axis=1) + self.position_embedding.astype(dtype)


def temporal_patch_size(config: "Blip2VisionConfig") -> int:
    """Frames per patch: 1 for published checkpoints, k with the ``temporal_patch_size`` extension."""
    size = int(getattr(config, "temporal_patch_size", 1) or 1)
    if size < 1:
        raise ValueError(f"vision_config.temporal_patch_size must be 1 or more, got {size}")
    return size


class Blip2Attention(nn.Cell):
    """Multi-head self-attention with fused qkv projection (k has no bias in the checkpoints)."""

    def __init__(self, config: "Blip2VisionConfig"):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f"hidden_size {self.embed_dim} is not divisible by {self.num_heads} heads")
        self.scale = self.head_dim**-0.5
        self.qkv = Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.projection = Linear(self.embed_dim, self.embed_dim)

    def construct(self, hidden_states: Tensor) -> Tensor:
        b, n, d = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(b, n, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        return self.projection(attention(qkv[0] * self.scale, qkv[1], qkv[2]))


class Blip2MLP(nn.Cell):
    def __init__(self, config: "Blip2VisionConfig"):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def construct(self, x: Tensor) -> Tensor:
        return self.fc2(gelu(self.fc1(x)))


class Blip2EncoderLayer(nn.Cell):
    """Pre-norm transformer block."""

    def __init__(self, config: "Blip2VisionConfig"):
        super().__init__()
        self.self_attn = Blip2Attention(config)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Blip2MLP(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def construct(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Blip2Encoder(nn.Cell):
    def __init__(self, config: "Blip2VisionConfig"):
        super().__init__()
        self.layers = nn.CellList([Blip2EncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def construct(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Blip2VisionModel(nn.Cell):
    """Images (N, C, H, W) -> post-layer-normed tokens (N, 1 + patches, D), class token first.

    C is 3, or 3k for k-frame tubelets (``temporal_patch_size``).

    Only the configured ``image_size`` is supported (no position interpolation).
    """

    def __init__(self, config: "Blip2VisionConfig"):
        super().__init__()
        self.config = config
        self.embeddings = Blip2VisionEmbeddings(config)
        self.encoder = Blip2Encoder(config)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def construct(self, pixel_values: Tensor, frame_embeds: Optional[Tensor] = None) -> Tensor:
        """``frame_embeds`` (N, D): added to every token of each image (e.g. the frame's time in its video)."""
        embeds = self.embeddings(pixel_values)
        if frame_embeds is not None:
            embeds = embeds + frame_embeds.astype(embeds.dtype)[:, None, :]
        return self.post_layernorm(self.encoder(embeds))


_Q_BIAS = re.compile(r"^(.*self_attn\.)q_bias$")


def merge_q_v_bias(tensors: dict[str, TensorRef]) -> None:
    """Fold LAVIS-style ``self_attn.q_bias``/``v_bias`` pairs into one ``self_attn.qkv.bias`` (q, 0, v)."""
    for name in [n for n in tensors if _Q_BIAS.match(n)]:
        prefix = _Q_BIAS.match(name).group(1)
        if prefix + "v_bias" not in tensors:
            continue
        q_ref, v_ref = tensors.pop(name), tensors.pop(prefix + "v_bias")

        def read(q_ref=q_ref, v_ref=v_ref) -> np.ndarray:
            q, v = q_ref.read(), v_ref.read()
            return np.concatenate([q, np.zeros_like(v), v])

        tensors[prefix + "qkv.bias"] = TensorRef((3 * q_ref.shape[0],), read)
