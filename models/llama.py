"""Llama (and Mistral) decoder-only language model, parameter names as in transformers.

Grouped-query attention with rotary position embeddings (RoPE, incl. Llama-3's ``rope_theta`` and the
rope types "llama3" and "linear"), RMSNorm and a SwiGLU MLP. Built inside
``models.parallel.building`` the heads, the MLP and the vocabulary are split across a tensor-parallel
group (q/k/v, gate/up column-parallel; o/down row-parallel).

Mistral is the same architecture here: its sliding-window attention only differs from full causal
attention for contexts longer than ``sliding_window`` (4096+ tokens), far beyond captioning prompts,
so the window is ignored.

Positions come from the attention mask's cumulative sum, so left-padded batches get the same positions
as unpadded prompts (as transformers' ``generate`` computes ``position_ids``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from models.attention import cached_self_attention
from models.generation import GenerateOutput, causal_lm_loss, generate, slot_ids, to_tensor
from models.layers import RMSNorm, apply_rotary, silu_mul
from models.moe import mlp_for
from models.parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, split_heads,
                             tied_logits, vocab_head)


@dataclass
class CausalLMOutput:
    logits: Tensor
    loss: Optional[Tensor] = None


def rope_inverse_frequencies(config) -> np.ndarray:
    """RoPE inverse frequencies (float32) for ``config``, with Llama-3 or linear scaling.

    transformers 5 holds ``rope_theta`` and the scaling (``rope_type`` and its keys) in ``config.rope_parameters``,
    which it fills from config.json's top-level ``rope_theta`` and ``rope_scaling``. A ``partial_rotary_factor``
    there (Qwen3.5) rotates only that share of each head's channels: fewer frequencies, over that width.
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = config.rope_parameters
    base = float(rope["rope_theta"])
    dim = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / np.power(np.float32(base), exponents)).astype(np.float32)
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return (inv_freq / np.float32(rope["factor"])).astype(np.float32)
    if kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_context = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise NotImplementedError(f"rope_type {kind!r} is not supported (default, linear, llama3)")


class LlamaAttention(nn.Cell):
    """Grouped-query self-attention: ``num_key_value_heads`` key/value heads shared by groups of query heads.

    ``num_heads``/``num_kv_heads`` are this rank's (all of them without tensor parallelism)."""

    def __init__(self, config, qkv_bias: bool | None = None, o_bias: bool | None = None, qk_norm: bool = False,
                 output_gate: bool = False, unit_offset_norm: bool = False):
        """Biases follow ``config.attention_bias`` unless given (Qwen2: q/k/v with bias, o without).
        ``qk_norm``: Qwen3's per-head RMSNorm of queries and keys (``q_norm``/``k_norm``) before the rotary.
        ``output_gate``: Qwen3.5's gated attention: ``q_proj`` gives each head its queries then as many gate
        channels, and the heads' output is multiplied by sigmoid(gate) before ``o_proj``.
        ``unit_offset_norm``: the q/k norms scale by 1 + weight (Qwen3.5, see ``RMSNorm``)."""
        super().__init__()
        dim = config.hidden_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = getattr(config, "head_dim", None) or dim // heads
        self.scaling = self.head_dim ** -0.5
        split = split_heads(heads, kv_heads, self.head_dim)
        self.num_heads, self.num_kv_heads = split.heads, split.kv_heads
        bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = bias if qkv_bias is None else qkv_bias
        self.output_gate = output_gate
        widen = 2 if output_gate else 1  # a head's query and gate rows are adjacent: a rank's heads stay one range
        self.q_proj = ColumnParallelLinear(dim, widen * heads * self.head_dim, qkv_bias,
                                           rows=(widen * split.q_rows[0], widen * split.q_rows[1]))
        self.k_proj = ColumnParallelLinear(dim, kv_heads * self.head_dim, qkv_bias, rows=split.kv_rows)
        self.v_proj = ColumnParallelLinear(dim, kv_heads * self.head_dim, qkv_bias, rows=split.kv_rows)
        self.o_proj = RowParallelLinear(heads * self.head_dim, dim, bias if o_bias is None else o_bias,
                                        cols=split.q_rows)
        norm_eps = config.rms_norm_eps
        self.q_norm = RMSNorm(self.head_dim, norm_eps, unit_offset_norm) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps, unit_offset_norm) if qk_norm else None

    def _heads(self, x: Tensor, heads: int, norm: Optional[RMSNorm] = None) -> Tensor:
        b, t = x.shape[:2]
        x = x.reshape(b, t, heads, self.head_dim)
        return (x if norm is None else norm(x)).swapaxes(1, 2)

    def _queries_and_gate(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """``q_proj``'s queries and, with ``output_gate``, the gate (B, T, heads * head_dim) split off each head's."""
        projected = self.q_proj(x)
        if not self.output_gate:
            return projected, None
        b, t = x.shape[:2]
        projected = projected.reshape(b, t, self.num_heads, 2 * self.head_dim)
        return projected[..., :self.head_dim], projected[..., self.head_dim:].reshape(b, t, -1)

    def construct(self, x, cos, sin, mask, slots, past_key=None, past_value=None):
        queries, gate = self._queries_and_gate(x)
        query = self._heads(queries, self.num_heads, self.q_norm)
        key = self._heads(self.k_proj(x), self.num_kv_heads, self.k_norm)
        value = self._heads(self.v_proj(x), self.num_kv_heads)
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        out, key, value = cached_self_attention(query * self.scaling, key, value, mask, slots, past_key, past_value)
        if gate is not None:
            out = out * ops.sigmoid(gate)
        return self.o_proj(out), key, value


class LlamaMLP(nn.Cell):
    """SwiGLU: down(silu(gate(x)) * up(x)); ``intermediate_size`` None: the config's (another: a shared expert)."""

    def __init__(self, config, intermediate_size: Optional[int] = None):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        size, inner = config.hidden_size, intermediate_size or config.intermediate_size
        self.gate_proj = ColumnParallelLinear(size, inner, bias, what="intermediate_size")
        self.up_proj = ColumnParallelLinear(size, inner, bias, what="intermediate_size")
        self.down_proj = RowParallelLinear(inner, size, bias, what="intermediate_size")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"Llama port supports hidden_act='silu', got {config.hidden_act!r}")

    def construct(self, x: Tensor) -> Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class LlamaDecoderLayer(nn.Cell):
    """Pre-norm block; ``cos``/``sin`` come broadcastable to (B, heads, T, head_dim); ``mask`` (B, L) marks
    the filled key slots."""

    def __init__(self, config, qkv_bias: bool | None = None, o_bias: bool | None = None, qk_norm: bool = False,
                 index: int = 0):
        """``index``: the layer's place in the stack, which decides whether it has experts (``models.moe``)."""
        super().__init__()
        self.self_attn = LlamaAttention(config, qkv_bias, o_bias, qk_norm)
        self.mlp = mlp_for(config, index, partial(LlamaMLP, config))
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def construct(self, x, cos, sin, mask, slots, past_key=None, past_value=None):
        attn, key, value = self.self_attn(self.input_layernorm(x), cos, sin, mask, slots, past_key, past_value)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), key, value


class LlamaModel(nn.Cell):
    """The decoder stack. A subclass may build other layers (:meth:`decoder_layer`) that take the same arguments
    and two cache tensors each (Qwen3.5's hybrid layers), and a final norm that scales by 1 + weight."""

    unit_offset_norm = False

    def __init__(self, config, qkv_bias: bool | None = None, o_bias: bool | None = None, qk_norm: bool = False):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.CellList([self.decoder_layer(config, i, qkv_bias, o_bias, qk_norm)
                                   for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, self.unit_offset_norm)
        self.inv_freq = Tensor(rope_inverse_frequencies(config))

    def decoder_layer(self, config, index: int, qkv_bias: bool | None, o_bias: bool | None,
                      qk_norm: bool) -> nn.Cell:
        """Layer ``index`` of the stack."""
        return LlamaDecoderLayer(config, qkv_bias, o_bias, qk_norm, index)

    def construct(self, inputs_embeds, attention_mask, cache_position, cache=None):
        """Run T positions written at slots cache_position..; attention_mask covers all L key slots."""
        slots = slot_ids(cache_position, inputs_embeds.shape[1])
        mask = attention_mask.astype(ms.int32)
        positions = ops.gather(ops.cumsum(mask, 1) * mask - 1, slots, 1)
        positions = ops.maximum(positions, ops.zeros_like(positions)).astype(ms.float32)
        freqs = positions[:, :, None] * self.inv_freq[None, None, :]
        emb = ops.concat((freqs, freqs), axis=-1)[:, None]
        dtype = inputs_embeds.dtype
        cos, sin = ops.cos(emb).astype(dtype), ops.sin(emb).astype(dtype)
        x = inputs_embeds
        new_cache = ()
        for i, layer in enumerate(self.layers):
            if cache is None:
                x, _, _ = layer(x, cos, sin, mask, slots)
            else:
                x, key, value = layer(x, cos, sin, mask, slots, cache[2 * i], cache[2 * i + 1])
                new_cache += (key, value)
        return self.norm(x), new_cache


class LlamaForCausalLM(nn.Cell):
    """Llama/Mistral with its LM head (tied to ``embed_tokens`` when ``tie_word_embeddings``).

    ``qkv_bias``/``o_bias``: a subclass's attention biases (None: ``config.attention_bias``), see ``models.qwen2``;
    ``qk_norm``: its per-head query/key norms (``models.qwen3``); ``decoder_class``: its stack (``models.qwen3_5``).
    """

    is_encoder_decoder = False
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    qk_norm: bool = False
    decoder_class: type = LlamaModel

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = self.decoder_class(config, self.qkv_bias, self.o_bias, self.qk_norm)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else vocab_head(config.hidden_size, config.vocab_size)
        self.tied_weights_keys = ("lm_head.weight",) if self.tie_word_embeddings else ()

    def get_input_embeddings(self) -> VocabParallelEmbedding:
        return self.model.embed_tokens

    def _logits(self, hidden: Tensor) -> Tensor:
        return tied_logits(hidden, self.model.embed_tokens) if self.lm_head is None else self.lm_head(hidden)

    def construct(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None) -> CausalLMOutput:
        """Full-sequence forward (no cache); loss is the shifted next-token cross-entropy."""
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(to_tensor(input_ids, ms.int32))
        else:
            inputs_embeds = to_tensor(inputs_embeds)
        if attention_mask is None:
            attention_mask = ops.ones(inputs_embeds.shape[:2], ms.int32)
        hidden, _ = self.model(inputs_embeds, to_tensor(attention_mask, ms.int32), 0)
        logits = self._logits(hidden).astype(ms.float32)
        loss = None if labels is None else causal_lm_loss(logits, to_tensor(labels, ms.int32), shift=True)
        return CausalLMOutput(logits=logits, loss=loss)

    # --- generation protocol (see models.generation)

    def init_cache(self, batch_size: int, max_length: int) -> tuple:
        attn = self.model.layers[0].self_attn
        shape = (batch_size, attn.num_kv_heads, max_length, attn.head_dim)
        dtype = self.model.embed_tokens.weight.dtype
        return tuple(ops.zeros(shape, dtype) for _ in range(2 * len(self.model.layers)))

    def decode_step(self, input_ids, inputs_embeds, attention_mask, cache_position, *cache):
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        hidden, new_cache = self.model(inputs_embeds, attention_mask, cache_position, cache)
        logits = self._logits(hidden[:, -1:])[:, 0].astype(ms.float32)
        return (logits,) + new_cache

    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, **kwargs) -> GenerateOutput:
        """See ``models.generation.generate``; with ``inputs_embeds`` only the new tokens are returned."""
        return generate(self, input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        **kwargs)
