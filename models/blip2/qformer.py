"""BLIP-2 Querying Transformer (Q-Former) for captioning, with transformers' parameter names.

A BERT-style encoder run on the learned query tokens only: self-attention among the
queries, cross-attention to the image (or all frames') tokens every
``cross_attention_frequency`` layers, then the query feed-forward
(``intermediate_query``/``output_query``). With ``groups`` G the cross-attention is
split: the queries and the encoder tokens each form G equal consecutive groups (a
video's frames) and query group g attends to token group g only; self-attention still
spans all queries. Inference only: dropout is the identity.
The text feed-forward (``intermediate``/``output``) exists only when the config has
``use_qformer_text_input`` (retrieval checkpoints) so those weights load; captioning
never runs text through the Q-Former.
"""
from __future__ import annotations

import re

from typing import TYPE_CHECKING

from mindspore import Tensor, nn

from models.attention import attention
from models.layers import LayerNorm, Linear, gelu

if TYPE_CHECKING:
    from transformers import Blip2QFormerConfig


def lavis_qformer_rules(lavis: str, ours: str) -> tuple[tuple[str, str], ...]:
    """Checkpoint renames from a LAVIS Q-Former (``<lavis>.bert.*``, ``attention.self``) to ours
    (transformers' names under ``<ours>``), for LAVIS and Video-LLaMA training files."""
    return ((rf"^{re.escape(lavis)}\.bert\.embeddings\.LayerNorm\.", f"{ours}.layernorm."),
            (rf"^{re.escape(lavis)}\.bert\.", f"{ours}."),
            (rf"^({re.escape(ours)}\.encoder\.layer\.\d+\.(?:cross)?attention)\.self\.", r"\1.attention."))


class Blip2QFormerMultiHeadAttention(nn.Cell):
    """Scaled dot-product attention; keys/values come from the encoder states for cross-attention."""

    def __init__(self, config: "Blip2QFormerConfig", is_cross_attention: bool = False):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not divisible by "
                             f"{config.num_attention_heads} heads")
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise NotImplementedError("Only absolute position embeddings are supported in the Q-Former")
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        kv_dim = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = Linear(config.hidden_size, config.hidden_size)
        self.key = Linear(kv_dim, config.hidden_size)
        self.value = Linear(kv_dim, config.hidden_size)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def construct(self, hidden_states: Tensor, kv_states: Tensor, groups: int = 1) -> Tensor:
        q = self._heads(self.query(hidden_states)) * self.head_dim**-0.5
        k = self._heads(self.key(kv_states))
        v = self._heads(self.value(kv_states))
        if groups == 1:
            return attention(q, k, v)
        out = attention(_split_groups(q, groups), _split_groups(k, groups), _split_groups(v, groups))
        return out.reshape(hidden_states.shape[0], -1, out.shape[-1])


def _split_groups(x: Tensor, groups: int) -> Tensor:
    """(B, H, G*n, d) -> (B*G, H, n, d): each consecutive group of n positions becomes its own batch row."""
    b, h, length, d = x.shape
    n = length // groups
    return x.reshape(b, h, groups, n, d).transpose(0, 2, 1, 3, 4).reshape(b * groups, h, n, d)


class Blip2QFormerSelfOutput(nn.Cell):
    """Dense projection, residual, LayerNorm (post-norm)."""

    def __init__(self, config: "Blip2QFormerConfig"):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def construct(self, hidden_states: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(hidden_states) + residual)


class Blip2QFormerAttention(nn.Cell):
    def __init__(self, config: "Blip2QFormerConfig", is_cross_attention: bool = False):
        super().__init__()
        self.attention = Blip2QFormerMultiHeadAttention(config, is_cross_attention)
        self.output = Blip2QFormerSelfOutput(config)

    def construct(self, hidden_states: Tensor, kv_states: Tensor, groups: int = 1) -> Tensor:
        return self.output(self.attention(hidden_states, kv_states, groups), hidden_states)


class Blip2QFormerIntermediate(nn.Cell):
    def __init__(self, config: "Blip2QFormerConfig"):
        super().__init__()
        if config.hidden_act != "gelu":
            raise NotImplementedError(f"Q-Former hidden_act {config.hidden_act!r} is not supported (only 'gelu')")
        self.dense = Linear(config.hidden_size, config.intermediate_size)

    def construct(self, x: Tensor) -> Tensor:
        return gelu(self.dense(x))


class Blip2QFormerOutput(nn.Cell):
    def __init__(self, config: "Blip2QFormerConfig"):
        super().__init__()
        self.dense = Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def construct(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Blip2QFormerLayer(nn.Cell):
    def __init__(self, config: "Blip2QFormerConfig", layer_idx: int):
        super().__init__()
        self.attention = Blip2QFormerAttention(config)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = Blip2QFormerAttention(config, is_cross_attention=True)
        if config.use_qformer_text_input:
            self.intermediate = Blip2QFormerIntermediate(config)
            self.output = Blip2QFormerOutput(config)
        self.intermediate_query = Blip2QFormerIntermediate(config)
        self.output_query = Blip2QFormerOutput(config)

    def construct(self, queries: Tensor, encoder_hidden_states: Tensor, groups: int = 1) -> Tensor:
        x = self.attention(queries, queries)
        if self.has_cross_attention:
            x = self.crossattention(x, encoder_hidden_states, groups)
        return self.output_query(self.intermediate_query(x), x)


class Blip2QFormerEncoder(nn.Cell):
    def __init__(self, config: "Blip2QFormerConfig"):
        super().__init__()
        self.layer = nn.CellList([Blip2QFormerLayer(config, i) for i in range(config.num_hidden_layers)])

    def construct(self, queries: Tensor, encoder_hidden_states: Tensor, groups: int = 1) -> Tensor:
        for layer in self.layer:
            queries = layer(queries, encoder_hidden_states, groups)
        return queries


class Blip2QFormerModel(nn.Cell):
    """(B, Q, H) query embeddings + (B, S, D_vision) encoder states -> (B, Q, H) query outputs.

    S may span several frames (B, T*N): every query attends over all of them, or with ``groups`` G
    query group g over token group g only (Q and S both divisible by G).
    """

    def __init__(self, config: "Blip2QFormerConfig"):
        super().__init__()
        self.config = config
        self.layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Blip2QFormerEncoder(config)

    def construct(self, query_embeds: Tensor, encoder_hidden_states: Tensor, groups: int = 1) -> Tensor:
        dtype = self.layernorm.weight.dtype
        queries = self.layernorm(query_embeds.astype(dtype))
        return self.encoder(queries, encoder_hidden_states.astype(dtype), groups)
