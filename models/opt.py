"""OPT decoder-only language model (the BLIP-2 OPT text decoder), parameter names as in transformers.

Positions come from the attention mask's cumulative sum (plus OPT's offset of 2), so left-padded
batches get the same positions as unpadded prompts. The same code serves a plain forward
(training, scoring) and the cached decoding step used by ``models.generation``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mindspore as ms
from mindspore import Tensor, nn, ops

from models.attention import cached_self_attention
from models.generation import GenerateOutput, causal_lm_loss, generate, slot_ids, to_tensor
from models.layers import Embedding, LayerNorm, Linear
from models.parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, split_heads,
                             tied_logits, vocab_head)

POSITION_OFFSET = 2


@dataclass
class CausalLMOutput:
    logits: Tensor
    loss: Optional[Tensor] = None


class OPTAttention(nn.Cell):
    """Multi-head self-attention; the query is scaled before the product, as in OPT."""

    def __init__(self, hidden_size: int, num_heads: int, bias: bool):
        """``num_heads`` of the whole model; ``self.num_heads`` are this rank's (tensor parallelism)."""
        super().__init__()
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim ** -0.5
        split = split_heads(num_heads, num_heads, self.head_dim)
        self.num_heads = split.heads
        self.k_proj = ColumnParallelLinear(hidden_size, hidden_size, bias, rows=split.q_rows)
        self.v_proj = ColumnParallelLinear(hidden_size, hidden_size, bias, rows=split.q_rows)
        self.q_proj = ColumnParallelLinear(hidden_size, hidden_size, bias, rows=split.q_rows)
        self.out_proj = RowParallelLinear(hidden_size, hidden_size, bias, cols=split.q_rows)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_dim).swapaxes(1, 2)

    def construct(self, x, mask, slots, past_key=None, past_value=None):
        query = self._heads(self.q_proj(x) * self.scaling)
        key, value = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        out, key, value = cached_self_attention(query, key, value, mask, slots, past_key, past_value)
        return self.out_proj(out), key, value


class OPTDecoderLayer(nn.Cell):
    def __init__(self, config):
        super().__init__()
        dim = config.hidden_size
        affine = config.layer_norm_elementwise_affine
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(dim, config.num_attention_heads, config.enable_bias)
        self.self_attn_layer_norm = LayerNorm(dim, bias=affine)
        self.fc1 = ColumnParallelLinear(dim, config.ffn_dim, config.enable_bias, what="ffn_dim")
        self.fc2 = RowParallelLinear(config.ffn_dim, dim, config.enable_bias, what="ffn_dim")
        self.final_layer_norm = LayerNorm(dim, bias=affine)
        if config.activation_function != "relu":
            raise ValueError(f"OPT port supports activation_function='relu', got {config.activation_function!r}")

    def construct(self, x, mask, slots, past_key=None, past_value=None):
        residual = x
        if self.do_layer_norm_before:
            x = self.self_attn_layer_norm(x)
        x, key, value = self.self_attn(x, mask, slots, past_key, past_value)
        x = residual + x
        if not self.do_layer_norm_before:
            x = self.self_attn_layer_norm(x)
        residual = x
        if self.do_layer_norm_before:
            x = self.final_layer_norm(x)
        x = residual + self.fc2(ops.relu(self.fc1(x)))
        if not self.do_layer_norm_before:
            x = self.final_layer_norm(x)
        return x, key, value


class OPTDecoder(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.word_embed_proj_dim)
        self.embed_positions = Embedding(config.max_position_embeddings + POSITION_OFFSET, config.hidden_size)
        projected = config.word_embed_proj_dim != config.hidden_size
        self.project_in = Linear(config.word_embed_proj_dim, config.hidden_size, bias=False) if projected else None
        self.project_out = Linear(config.hidden_size, config.word_embed_proj_dim, bias=False) if projected else None
        keep_final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        self.final_layer_norm = LayerNorm(config.hidden_size, bias=config.layer_norm_elementwise_affine) \
            if keep_final_norm else None
        self.layers = nn.CellList([OPTDecoderLayer(config) for _ in range(config.num_hidden_layers)])

    def construct(self, inputs_embeds, attention_mask, cache_position, cache=None):
        """Run T positions written at slots cache_position..; attention_mask covers all L key slots."""
        slots = slot_ids(cache_position, inputs_embeds.shape[1])
        mask = attention_mask.astype(ms.int32)
        positions = ops.gather(ops.cumsum(mask, 1) * mask - 1, slots, 1)
        x = inputs_embeds
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET).astype(x.dtype)
        new_cache = ()
        for i, layer in enumerate(self.layers):
            if cache is None:
                x, _, _ = layer(x, mask, slots)
            else:
                x, key, value = layer(x, mask, slots, cache[2 * i], cache[2 * i + 1])
                new_cache += (key, value)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x, new_cache


class OPTModel(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(nn.Cell):
    """OPT with its LM head; ``lm_head`` is tied to ``embed_tokens`` unless the config unties it.

    ``tied_weights_keys`` lists checkpoint keys that may be present but are the tied embedding.
    """

    is_encoder_decoder = False

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.tie_word_embeddings = getattr(config, "tie_word_embeddings", True)
        self.lm_head = None if self.tie_word_embeddings else vocab_head(config.word_embed_proj_dim, config.vocab_size)
        self.tied_weights_keys = ("lm_head.weight",) if self.tie_word_embeddings else ()

    def get_input_embeddings(self) -> VocabParallelEmbedding:
        return self.model.decoder.embed_tokens

    def _logits(self, hidden: Tensor) -> Tensor:
        return tied_logits(hidden, self.model.decoder.embed_tokens) if self.lm_head is None else self.lm_head(hidden)

    def construct(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None) -> CausalLMOutput:
        """Full-sequence forward (no cache); loss is the shifted next-token cross-entropy."""
        if inputs_embeds is None:
            inputs_embeds = self.model.decoder.embed_tokens(to_tensor(input_ids, ms.int32))
        else:
            inputs_embeds = to_tensor(inputs_embeds)
        if attention_mask is None:
            attention_mask = ops.ones(inputs_embeds.shape[:2], ms.int32)
        hidden, _ = self.model.decoder(inputs_embeds, to_tensor(attention_mask, ms.int32), 0)
        logits = self._logits(hidden)
        loss = None if labels is None else causal_lm_loss(logits, to_tensor(labels, ms.int32), shift=True)
        return CausalLMOutput(logits=logits, loss=loss)

    # --- generation protocol (see models.generation)

    def init_cache(self, batch_size: int, max_length: int) -> tuple:
        attn = self.model.decoder.layers[0].self_attn  # this rank's heads
        shape = (batch_size, attn.num_heads, max_length, attn.head_dim)
        dtype = self.model.decoder.embed_tokens.weight.dtype
        return tuple(ops.zeros(shape, dtype) for _ in range(2 * len(self.model.decoder.layers)))

    def decode_step(self, input_ids, inputs_embeds, attention_mask, cache_position, *cache):
        if inputs_embeds is None:
            inputs_embeds = self.model.decoder.embed_tokens(input_ids)
        hidden, new_cache = self.model.decoder(inputs_embeds, attention_mask, cache_position, cache)
        logits = self._logits(hidden[:, -1:])[:, 0].astype(ms.float32)
        return (logits,) + new_cache

    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, **kwargs) -> GenerateOutput:
        """See ``models.generation.generate``; with ``inputs_embeds`` only the new tokens are returned."""
        return generate(self, input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        **kwargs)
