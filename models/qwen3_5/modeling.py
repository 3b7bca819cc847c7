"""Qwen3.5's hybrid text decoder (``Qwen3_5ForCausalLM``, ``model_type: qwen3_5_text``) and its MoE variant
(``qwen3_5_moe_text``), as transformers 5.25 has them; parameter names are transformers'.

Each layer's token mixer follows ``config.layer_types``: "linear_attention" is a Gated DeltaNet
(``models.linear_attention``, ``linear_attn``), "full_attention" is Llama's attention (``models.llama``,
``self_attn``) in Qwen3.5's form: per-head q/k RMSNorm, an output gate (``q_proj`` is twice as wide, each head's
queries followed by as many gate channels; the heads' output is multiplied by sigmoid(gate) before ``o_proj``)
and rotary positions on the first ``partial_rotary_factor`` of each head's channels only. Every RMSNorm but the
DeltaNet's gated one scales by 1 + weight. The MLP is Llama's SwiGLU, or in the MoE model experts in every layer
plus a shared expert with its own sigmoid gate (``models.moe``).

Positions: Qwen3.5's rotary is Qwen3-VL's interleaved M-RoPE, which for text (one position on all three axes) is
plain 1-D RoPE; it comes from the attention mask as in ``models.llama``, so left padding does not shift it.

The decoding cache (``models.generation``'s contract) holds two tensors per layer, batch first: a full-attention
layer's keys and values (B, kv_heads, max_length, head_dim), a DeltaNet layer's conv state (B, channels, kernel)
and recurrent state (B, value heads, key dim, value dim) float32, whose sizes do not grow with the length. A
prompt (T > 1 positions, written at slot 0) runs the chunked delta rule from empty states, with the attention
mask's slots for its positions, so left padding never enters the states; a one-token step runs the recurrent
rule. Beam search reorders every one of them as rows.

Tensor parallelism (``models.parallel``, ``tp_size`` > 1 under msrun): a DeltaNet layer splits by key heads with
their value heads (``models.linear_attention.GatedDeltaNet``; linear_num_key_heads must divide by tp_size), the
gated attention by heads as Llama's, the MLP by columns, the MoE layer by experts; each rank's states and KV cache
hold only its heads.

The vision-language models (``qwen3_5``, ``qwen3_5_moe``) wrap this stack: ``models.qwen3_5.vision_language``.
"""
from __future__ import annotations

from functools import partial

import mindspore as ms
from mindspore import nn, ops

from models.layers import RMSNorm
from models.linear_attention import GatedDeltaNet
from models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel
from models.moe import expert_checkpoint_hook, mlp_for, num_experts

LINEAR, FULL = "linear_attention", "full_attention"


def check_layer_types(config) -> list[str]:
    """``config.layer_types``, one known kind per layer (ValueError naming the problem otherwise)."""
    kinds = list(config.layer_types or ())
    if len(kinds) != config.num_hidden_layers:
        raise ValueError(f"layer_types has {len(kinds)} entries for num_hidden_layers {config.num_hidden_layers}")
    unknown = sorted(set(kinds) - {LINEAR, FULL})
    if unknown:
        raise ValueError(f"layer_types {unknown} not supported; supported: {FULL!r}, {LINEAR!r}")
    return kinds


class Qwen3_5DecoderLayer(nn.Cell):
    """A pre-norm block mixing tokens with ``linear_attn`` or ``self_attn`` as ``config.layer_types[index]`` says.

    Called as ``LlamaDecoderLayer``; its two cache tensors are the DeltaNet's conv and recurrent states or the
    attention's keys and values, and it returns their new values."""

    def __init__(self, config, index: int):
        super().__init__()
        self.linear = config.layer_types[index] == LINEAR
        self.linear_attn = GatedDeltaNet(config) if self.linear else None
        self.self_attn = None if self.linear else LlamaAttention(config, qk_norm=True, output_gate=True,
                                                                  unit_offset_norm=True)
        self.mlp = mlp_for(config, index, partial(LlamaMLP, config))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True)

    def construct(self, x, cos, sin, mask, slots, first=None, second=None):
        normed = self.input_layernorm(x)
        if not self.linear:
            mixed, first, second = self.self_attn(normed, cos, sin, mask, slots, first, second)
        elif first is None or x.shape[1] > 1:  # a whole sequence, or a prompt: from empty states
            mixed, first, second = self.linear_attn.prompt(normed, ops.gather(mask, slots, 1))
        else:
            mixed, first, second = self.linear_attn.step(normed, first, second)
        x = x + mixed
        return x + self.mlp(self.post_attention_layernorm(x)), first, second


class Qwen3_5TextModel(LlamaModel):
    """Llama's stack (embeddings, positions from the mask, the layer loop) with Qwen3.5's layers and final norm."""

    unit_offset_norm = True

    def decoder_layer(self, config, index: int, *_llama_options) -> Qwen3_5DecoderLayer:
        return Qwen3_5DecoderLayer(config, index)


class Qwen3_5ForCausalLM(LlamaForCausalLM):
    """Qwen3.5 / Qwen3.5-MoE text decoder with its LM head; ``forward`` and ``generate`` as ``LlamaForCausalLM``."""

    decoder_class = Qwen3_5TextModel

    def __init__(self, config):
        check_layer_types(config)
        super().__init__(config)
        # an MoE prompt groups its tokens by expert on the host, so it runs op by op (see models.moe)
        self.compile_prompt = not num_experts(config)

    def checkpoint_hook(self, tensors: dict) -> None:
        """Drop the multi-token-prediction head Qwen publishes with Qwen3.5 and bring the experts to one layout."""
        drop_multi_token_prediction(tensors)
        expert_checkpoint_hook(self, tensors, self.config)

    def init_cache(self, batch_size: int, max_length: int) -> tuple:
        """Per layer: keys and values with ``max_length`` slots, or a DeltaNet's empty conv and recurrent states."""
        return hybrid_cache(self.model.layers, batch_size, max_length, self.model.embed_tokens.weight.dtype)


def drop_multi_token_prediction(tensors: dict) -> None:
    """Remove the multi-token-prediction head Qwen publishes with Qwen3.5 (``mtp.*``, unused for decoding, as
    transformers ignores it) from a checkpoint's ``{name: tensor}``."""
    for name in [name for name in tensors if name.startswith("mtp.")]:
        del tensors[name]


def hybrid_cache(layers, batch_size: int, max_length: int, dtype) -> tuple:
    """The decoding cache of a stack of :class:`Qwen3_5DecoderLayer`: per layer, keys and values (B, kv_heads,
    ``max_length``, head_dim) in ``dtype``, or a DeltaNet's empty conv state (B, channels, kernel) in ``dtype``
    and recurrent state (B, value heads, key dim, value dim) float32."""
    cache = ()
    for layer in layers:
        if layer.linear:
            net = layer.linear_attn
            cache += (ops.zeros((batch_size, net.conv_dim, net.conv_kernel_size), dtype),
                      ops.zeros((batch_size, net.num_v_heads, net.head_k_dim, net.head_v_dim), ms.float32))
        else:
            shape = (batch_size, layer.self_attn.num_kv_heads, max_length, layer.self_attn.head_dim)
            cache += (ops.zeros(shape, dtype), ops.zeros(shape, dtype))
    return cache
