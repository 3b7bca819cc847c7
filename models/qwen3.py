"""Text-only Qwen3 (``Qwen/Qwen3-*``, ``model_type: qwen3``) and Qwen3-MoE (``Qwen/Qwen3-30B-A3B-*``,
``qwen3_moe``), for caption enhancement.

The decoder is the one Qwen3-VL wraps: Llama's layers (``models.llama``) with Qwen3's per-head q/k RMSNorm,
its own ``head_dim`` and no attention biases (``attention_bias``), and, for Qwen3-MoE, experts in the layers
its config names (``models.moe``: ``decoder_sparse_step``, ``mlp_only_layers``; the router renormalises its
top-k weights as ``norm_topk_prob`` says). Without vision tokens Qwen3-VL's multimodal rotary positions are
plain 1-D RoPE, which ``models.llama`` computes. Qwen3-MoE's published experts are one matrix per expert and
projection; they load stacked (:func:`models.moe.adapt_expert_tensors`), as do fused ones.
"""
from __future__ import annotations

from models.llama import LlamaForCausalLM
from models.moe import expert_checkpoint_hook, num_experts


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 / Qwen3-MoE with transformers' parameter names (``model.layers.N.self_attn.q_norm.weight`` ...)."""

    qk_norm = True

    def __init__(self, config):
        if getattr(config, "use_sliding_window", False):
            raise NotImplementedError("sliding-window attention (use_sliding_window: true) is not supported; "
                                      "the published Qwen3 checkpoints do not use it")
        super().__init__(config)
        # an MoE prompt groups its tokens by expert on the host, so it runs op by op (see models.moe)
        self.compile_prompt = not num_experts(config)

    def checkpoint_hook(self, tensors: dict) -> None:
        expert_checkpoint_hook(self, tensors, self.config)
