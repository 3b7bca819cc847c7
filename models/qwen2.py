"""Text-only Qwen2 / Qwen2.5 (``Qwen/Qwen2.5-*-Instruct``, ``model_type: qwen2``).

The decoder is the one Qwen2-VL wraps (``models.qwen2_vl.modeling.Qwen2VLTextModel``): Llama's layers
with biased q/k/v projections and an unbiased output projection. Without vision tokens its multimodal
rotary positions are the same on all three axes, which is plain 1-D RoPE, so the text model is
``models.llama``'s causal LM (positions from the attention mask, KV cache, ``generate``) with those biases.
"""
from __future__ import annotations

from models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 with transformers' parameter names (``model.layers.N.self_attn.q_proj.bias`` ...)."""

    qkv_bias = True
    o_bias = False

    def __init__(self, config):
        if getattr(config, "use_sliding_window", False):
            raise NotImplementedError("sliding-window attention (use_sliding_window: true) is not supported; "
                                      "the published Qwen2 / Qwen2.5 checkpoints do not use it")
        super().__init__(config)
