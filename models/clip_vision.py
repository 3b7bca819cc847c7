"""CLIP vision tower (``CLIPVisionModel``) as the LLaVA family uses it, parameter names as in published checkpoints.

LLaVA reads the hidden state after a chosen encoder layer (``vision_feature_layer``, e.g. -2 = the
input of the last layer), not the pooled output, so :meth:`CLIPVisionModel.construct` runs only the
layers that state needs. ``post_layernorm`` is kept so checkpoints load by name, but is unused here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mindspore import Tensor, nn, ops

from models.attention import attention
from models.layers import Embedding, LayerNorm, Linear, activation, zeros_parameter

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig


class CLIPPatchEmbedding(nn.Cell):
    """Bias-free Conv2d with kernel = stride = patch size, as unfold + matmul (torch weight layout)."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.weight = zeros_parameter((embed_dim, in_channels, patch_size, patch_size))
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, pixel_values: Tensor) -> Tensor:
        b, c, h, w = pixel_values.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        x = pixel_values.reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c * p * p)
        y = self.matmul(x, self.weight.reshape(self.embed_dim, c * p * p))
        return y.reshape(b, gh * gw, self.embed_dim)


class CLIPVisionEmbeddings(nn.Cell):
    def __init__(self, config: "CLIPVisionConfig"):
        super().__init__()
        dim = config.hidden_size
        self.class_embedding = zeros_parameter((dim,))
        self.patch_embedding = CLIPPatchEmbedding(config.num_channels, dim, config.patch_size)
        self.position_embedding = Embedding((config.image_size // config.patch_size) ** 2 + 1, dim)

    def construct(self, pixel_values: Tensor) -> Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.astype(dtype))
        cls = ops.broadcast_to(self.class_embedding.reshape(1, 1, -1), (patches.shape[0], 1, patches.shape[2]))
        return ops.concat((cls.astype(dtype), patches), axis=1) + self.position_embedding.weight[None].astype(dtype)


class CLIPAttention(nn.Cell):
    def __init__(self, config: "CLIPVisionConfig"):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = Linear(dim, dim)
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).swapaxes(1, 2)

    def construct(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self._heads(self.q_proj(x) * self.scale), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        return self.out_proj(attention(q, k, v))


class CLIPMLP(nn.Cell):
    def __init__(self, config: "CLIPVisionConfig"):
        super().__init__()
        self.act = activation(config.hidden_act, "CLIP hidden_act")
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def construct(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    """Pre-norm transformer block."""

    def __init__(self, config: "CLIPVisionConfig"):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def construct(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Cell):
    def __init__(self, config: "CLIPVisionConfig"):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class CLIPVisionTransformer(nn.Cell):
    def __init__(self, config: "CLIPVisionConfig"):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPVisionModel(nn.Cell):
    """Images (N, 3, H, W) -> hidden state ``feature_layer`` (N, 1 + patches, D), class token first.

    ``feature_layer`` indexes transformers' ``hidden_states`` tuple (0 = embeddings after
    ``pre_layrnorm``, i = after layer i, negative from the end). Only the configured
    ``image_size`` is supported (no position interpolation).
    """

    # transformers 5's CLIPVisionModel has no ``vision_model`` level, so its save_pretrained may write
    # ``embeddings.*`` where published checkpoints (and transformers 4) have ``vision_model.embeddings.*``
    checkpoint_rename_rules = ((r"^(?!vision_model\.)", "vision_model."),)
    # non-persistent in transformers, but present in some older exported checkpoints
    tied_weights_keys = ("vision_model.embeddings.position_ids",)

    def __init__(self, config: "CLIPVisionConfig"):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.vision_model = CLIPVisionTransformer(config)

    def construct(self, pixel_values: Tensor, feature_layer: int = -1) -> Tensor:
        layers = self.vision_model.encoder.layers
        depth = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer
        x = self.vision_model.pre_layrnorm(self.vision_model.embeddings(pixel_values))
        for i in range(depth):
            x = layers[i](x)
        return x
