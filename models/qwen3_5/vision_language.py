"""Qwen3.5 and Qwen3.6, dense (``model_type: qwen3_5``, transformers' ``Qwen3_5ForConditionalGeneration``) and MoE
(``qwen3_5_moe``, ``Qwen3_5MoeForConditionalGeneration``): Qwen3-VL's model (``models.qwen3_vl``) with Qwen3.5's
hybrid decoder (``models.qwen3_5.modeling``), as transformers 5.25 has them.

What is Qwen3-VL's, unchanged: the vision tower, except that Qwen3.5's has no DeepStack (its vision config has no
``deepstack_visual_indexes``, so ``models.qwen3_vl.vision`` returns the merged tokens alone and the decoder gets no
features added); the placeholder filling; the 3-D positions (:func:`models.qwen3_vl.modeling.get_rope_index`: every
run of vision tokens its own item, a video written as one timestamped run per temporal patch); interleaved M-RoPE;
the processor and video rules (``models.qwen3_vl.processing``, which transformers also maps Qwen3.5 to).

What is Qwen3.5's: the decoder layers (Gated DeltaNet or gated full attention as ``text_config.layer_types`` says;
experts with a shared expert in the MoE model), the final norm that scales by 1 + weight, and the rotary on the first
``partial_rotary_factor`` of each head's channels only: the M-RoPE sections cover that width
(``MultimodalRotary``'s ``rotary_dim``; transformers' default section [11, 11, 10] when the config has none).

Decoding cache: the 3-D position table (Qwen2-VL's, ``models.qwen2_vl.modeling``), then per layer the hybrid stack's
two tensors (keys and values, or the DeltaNet's conv and recurrent states:
:func:`models.qwen3_5.modeling.hybrid_cache`), all batch first, so beam search reorders them as rows.

Checkpoints: Qwen's published Qwen3.5 / Qwen3.6 weights and transformers 5.25's ``save_pretrained`` both use the
nested layout (``model.language_model.*``, ``model.visual.*``, ``lm_head.weight`` unless the embeddings are tied);
the published ones also hold a multi-token-prediction head (``mtp.*``), which decoding does not use and is dropped.
Expert tensors load from every layout ``models.moe`` knows (per-expert matrices, fused, transposed).

Tensor parallelism: the decoder splits as ``models.qwen3_5.modeling`` describes (DeltaNet layers by key heads), the
vision tower as Qwen3-VL's. Not here: Ascend runs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from models.qwen2_vl.modeling import Qwen2VLTextModel
from models.qwen3_5.modeling import Qwen3_5DecoderLayer, check_layer_types, drop_multi_token_prediction, hybrid_cache
from models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration

if TYPE_CHECKING:
    from transformers import Qwen3_5Config


class Qwen3_5VLTextModel(Qwen2VLTextModel):
    """Qwen2-VL's decoder stack (M-RoPE from the position table, the layer loop) with Qwen3.5's hybrid layers,
    its 1 + weight final norm and partial rotary (``model.*``: transformers' ``model.language_model.*``)."""

    unit_offset_norm = True
    default_mrope_section = [11, 11, 10]  # transformers' Qwen3_5TextRotaryEmbedding default

    def decoder_layer(self, config, index: int, *_qwen2_options) -> Qwen3_5DecoderLayer:
        return Qwen3_5DecoderLayer(config, index)


class Qwen3_5ForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Qwen3.5 / Qwen3.6 (dense or MoE) with transformers' forward/generate arguments (see
    ``Qwen2VLForConditionalGeneration``)."""

    text_model_class = Qwen3_5VLTextModel

    def __init__(self, config: "Qwen3_5Config"):
        check_layer_types(config.text_config)
        super().__init__(config)

    def checkpoint_hook(self, tensors: dict) -> None:
        """Drop the multi-token-prediction head (``mtp.*``), then bring the experts to one layout."""
        drop_multi_token_prediction(tensors)
        super().checkpoint_hook(tensors)

    def layer_cache(self, batch_size: int, max_length: int) -> tuple:
        return hybrid_cache(self.model.layers, batch_size, max_length, self.model.embed_tokens.weight.dtype)
