"""T5 / Flan-T5 encoder-decoder (the BLIP-2 Flan-T5 text model), parameter names as in transformers.

RMS layer norm, unscaled attention with a learned relative-position bias (computed by the first block
of each stack and shared by the others), ReLU or gated-GELU feed-forward. The decoder step writes into
a static-shape self-attention cache and reuses cross-attention keys/values computed once per input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from models.attention import attention, cached_self_attention
from models.generation import GenerateOutput, causal_lm_loss, generate, slot_ids, to_tensor
from models.layers import Embedding, Linear, RMSNorm, activation
from models.parallel import require_unsplit


@dataclass
class Seq2SeqLMOutput:
    logits: Tensor
    loss: Optional[Tensor] = None
    encoder_last_hidden_state: Optional[Tensor] = None


def relative_position_buckets(bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of every relative position (key - query) in [-max_distance, max_distance].

    Positions further apart share the last bucket, so this table covers any length; float32 math
    mirrors transformers so bucket boundaries agree.
    """
    rel = np.arange(-max_distance, max_distance + 1, dtype=np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        large = (np.log(rel.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
                 * np.float32(num_buckets - max_exact))
    large = max_exact + np.nan_to_num(large, neginf=0.0).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class T5Attention(nn.Cell):
    """Unscaled multi-head attention; the first block owns ``relative_attention_bias``."""

    def __init__(self, config, has_relative_attention_bias: bool, bidirectional: bool):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = Linear(config.d_model, inner, bias=False)
        self.k = Linear(config.d_model, inner, bias=False)
        self.v = Linear(config.d_model, inner, bias=False)
        self.o = Linear(inner, config.d_model, bias=False)
        self.has_relative_attention_bias = has_relative_attention_bias
        if has_relative_attention_bias:
            self.relative_attention_bias = Embedding(config.relative_attention_num_buckets, config.num_heads)
            self.max_distance = config.relative_attention_max_distance
            self.buckets = Tensor(relative_position_buckets(
                bidirectional, config.relative_attention_num_buckets, self.max_distance))

    def heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_dim).swapaxes(1, 2)

    def position_bias(self, query_pos: Tensor):
        """The learned bias as an attention ``score_bias``: (1, H, q, k) for queries at ``query_pos``
        [q_start:q_stop] and keys k_start..k_stop-1, built one block at a time."""
        def bias(q_start: int, q_stop: int, k_start: int, k_stop: int) -> Tensor:
            rel = ops.arange(k_start, k_stop).astype(ms.int32)[None, :] - query_pos[q_start:q_stop, None]
            rel = ops.clip_by_value(rel, -self.max_distance, self.max_distance) + self.max_distance
            values = self.relative_attention_bias(ops.gather(self.buckets, rel, 0))
            return values.transpose(2, 0, 1)[None].astype(ms.float32)
        return bias

    def construct(self, x, key_mask, key, value):
        """Attend (no causal mask) from ``x`` to the encoder output's ``key``/``value`` (B, H, S, d)."""
        return self.o(attention(self.heads(self.q(x)), key, value, key_mask))


class T5LayerSelfAttention(nn.Cell):
    def __init__(self, config, has_relative_attention_bias: bool, bidirectional: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias, bidirectional)
        self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)

    def construct(self, x, mask, score_bias, slots=None, past_key=None, past_value=None):
        """Encoder (``slots`` None: bidirectional over ``mask``) or causal decoder self-attention."""
        attn = self.SelfAttention
        h = self.layer_norm(x)
        query, key, value = attn.heads(attn.q(h)), attn.heads(attn.k(h)), attn.heads(attn.v(h))
        if slots is None:
            out = attention(query, key, value, mask, score_bias=score_bias)
        else:
            out, key, value = cached_self_attention(query, key, value, mask, slots, past_key, past_value, score_bias)
        return x + attn.o(out), key, value


class T5LayerCrossAttention(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.EncDecAttention = T5Attention(config, False, False)
        self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)

    def construct(self, x, key_mask, key, value):
        return x + self.EncDecAttention(self.layer_norm(x), key_mask, key, value)


class T5DenseActDense(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.wi = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)
        self.act = activation(config.dense_act_fn, "T5 dense_act_fn")

    def construct(self, x):
        return self.wo(self.act(self.wi(x)))


class T5DenseGatedActDense(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.wi_0 = Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)
        self.act = activation(config.dense_act_fn, "T5 dense_act_fn")

    def construct(self, x):
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5LayerFF(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated_act else T5DenseActDense(config)
        self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)

    def construct(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Cell):
    def __init__(self, config, is_decoder: bool, has_relative_attention_bias: bool):
        super().__init__()
        layers = [T5LayerSelfAttention(config, has_relative_attention_bias, not is_decoder)]
        if is_decoder:
            layers.append(T5LayerCrossAttention(config))
        layers.append(T5LayerFF(config))
        self.layer = nn.CellList(layers)


class T5Stack(nn.Cell):
    """Encoder (bidirectional) or decoder (causal + cross-attention) stack of T5 blocks."""

    def __init__(self, config, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        num_layers = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.CellList([T5Block(config, is_decoder, i == 0) for i in range(num_layers)])
        self.final_layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)

    def encode(self, x, attention_mask):
        length = x.shape[1]
        score_bias = self.block[0].layer[0].SelfAttention.position_bias(ops.arange(length).astype(ms.int32))
        mask = attention_mask.astype(ms.int32)
        for block in self.block:
            x = block.layer[1](block.layer[0](x, mask, score_bias)[0])
        return self.final_layer_norm(x)

    def decode(self, x, attention_mask, cache_position, encoder_mask, cross_kv, cache=None):
        """T decoder positions at cache slots cache_position..; ``encoder_mask`` (B, S) marks real encoder
        positions, ``cross_kv`` = per-layer (k, v) of the encoder output; ``cache`` = per-layer
        self-attention (k, v) of L slots, or None (no cache)."""
        slots = slot_ids(cache_position, x.shape[1])
        mask = attention_mask.astype(ms.int32)
        score_bias = self.block[0].layer[0].SelfAttention.position_bias(slots)
        new_cache = ()
        for i, block in enumerate(self.block):
            if cache is None:
                x, _, _ = block.layer[0](x, mask, score_bias, slots)
            else:
                x, key, value = block.layer[0](x, mask, score_bias, slots, cache[2 * i], cache[2 * i + 1])
                new_cache += (key, value)
            x = block.layer[1](x, encoder_mask, cross_kv[2 * i], cross_kv[2 * i + 1])
            x = block.layer[2](x)
        return self.final_layer_norm(x), new_cache

    def cross_key_values(self, encoder_hidden: Tensor) -> tuple:
        out = ()
        for block in self.block:
            attn = block.layer[1].EncDecAttention
            out += (attn.heads(attn.k(encoder_hidden)), attn.heads(attn.v(encoder_hidden)))
        return out


class T5ForConditionalGeneration(nn.Cell):
    """T5 with its LM head. T5 v1.0 uses ``shared`` as its head and scales the decoder output by
    d_model**-0.5; T5 v1.1 and Flan-T5 (``tie_word_embeddings: false`` in config.json) have a separate
    ``lm_head`` and no scaling. transformers 5 reads that flag into ``config.scale_decoder_outputs`` and
    sets ``config.tie_word_embeddings`` to True for every T5 (it ties unless the checkpoint holds its own
    ``lm_head``), so the scaling flag decides both here.

    ``tied_weights_keys`` lists checkpoint keys that may be present but are copies of ``shared``.
    """

    is_encoder_decoder = True

    def __init__(self, config):
        require_unsplit("T5 (the language model of BLIP-2 FlanT5)")
        super().__init__()
        self.config = config
        self.model_dim = config.d_model
        self.shared = Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        tied = config.scale_decoder_outputs
        self.lm_head = None if tied else Linear(config.d_model, config.vocab_size, bias=False)
        self.tied_weights_keys = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight") + (
            ("lm_head.weight",) if tied else ())
        self.matmul_t = ops.MatMul(transpose_b=True)

    def get_input_embeddings(self) -> Embedding:
        return self.shared

    def _logits(self, hidden: Tensor) -> Tensor:
        if self.lm_head is not None:
            return self.lm_head(hidden)
        b, t, d = hidden.shape
        hidden = hidden * (self.model_dim ** -0.5)
        return self.matmul_t(hidden.reshape(b * t, d), self.shared.weight).reshape(b, t, -1)

    def shift_right(self, labels: Tensor) -> Tensor:
        """Decoder inputs from labels: prepend decoder_start_token_id, drop the last, -100 -> pad."""
        labels = labels.astype(ms.int32)
        start = ops.full((labels.shape[0], 1), self.config.decoder_start_token_id, dtype=ms.int32)
        shifted = ops.concat([start, labels[:, :-1]], axis=1)
        return ops.where(shifted == -100, ops.full_like(shifted, self.config.pad_token_id), shifted)

    def construct(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                  decoder_input_ids=None, decoder_attention_mask=None, decoder_inputs_embeds=None) -> Seq2SeqLMOutput:
        """Full forward (no cache). Decoder inputs default to ``shift_right(labels)``; loss is the mean
        cross-entropy of ``labels`` (-100 ignored)."""
        encoder_hidden, attention_mask = self.encode(input_ids, inputs_embeds, attention_mask)
        if labels is not None:
            labels = to_tensor(labels, ms.int32)
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.shift_right(labels)
        if decoder_inputs_embeds is None:
            if decoder_input_ids is None:
                raise ValueError("T5 needs labels, decoder_input_ids or decoder_inputs_embeds")
            decoder_inputs_embeds = self.shared(to_tensor(decoder_input_ids, ms.int32))
        else:
            decoder_inputs_embeds = to_tensor(decoder_inputs_embeds)
        if decoder_attention_mask is None:
            decoder_attention_mask = ops.ones(decoder_inputs_embeds.shape[:2], ms.int32)
        cross_kv = self.decoder.cross_key_values(encoder_hidden)
        hidden, _ = self.decoder.decode(decoder_inputs_embeds, to_tensor(decoder_attention_mask, ms.int32), 0,
                                        attention_mask, cross_kv)
        logits = self._logits(hidden)
        loss = None if labels is None else causal_lm_loss(logits, labels, shift=False)
        return Seq2SeqLMOutput(logits=logits, loss=loss, encoder_last_hidden_state=encoder_hidden)

    # --- generation protocol (see models.generation)

    def encode(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        """Encoder output and the (int32) attention mask it was computed with."""
        if inputs_embeds is None:
            inputs_embeds = self.shared(to_tensor(input_ids, ms.int32))
        else:
            inputs_embeds = to_tensor(inputs_embeds)
        if attention_mask is None:
            attention_mask = ops.ones(inputs_embeds.shape[:2], ms.int32)
        attention_mask = to_tensor(attention_mask, ms.int32)
        return self.encoder.encode(inputs_embeds, attention_mask), attention_mask

    def init_cache(self, batch_size: int, max_length: int, encoder_hidden: Tensor, attention_mask: Tensor) -> tuple:
        """Self-attention (k, v) per decoder layer, then cross (k, v) per layer, then the encoder mask."""
        cfg = self.config
        shape = (batch_size, cfg.num_heads, max_length, cfg.d_kv)
        dtype = self.shared.weight.dtype
        self_kv = tuple(ops.zeros(shape, dtype) for _ in range(2 * cfg.num_decoder_layers))
        return self_kv + self.decoder.cross_key_values(encoder_hidden) + (to_tensor(attention_mask, ms.int32),)

    def decode_step(self, input_ids, inputs_embeds, attention_mask, cache_position, *cache):
        if inputs_embeds is None:
            inputs_embeds = self.shared(input_ids)
        n = 2 * self.config.num_decoder_layers
        hidden, new_cache = self.decoder.decode(inputs_embeds, attention_mask, cache_position, cache[-1],
                                                cache[n:2 * n], cache[:n])
        logits = self._logits(hidden[:, -1:])[:, 0].astype(ms.float32)
        return (logits,) + new_cache + cache[n:]

    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, **kwargs) -> GenerateOutput:
        """See ``models.generation.generate``; sequences start with ``decoder_start_token_id``."""
        return generate(self, input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        **kwargs)
