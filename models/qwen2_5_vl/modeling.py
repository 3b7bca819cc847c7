"""Qwen2.5-VL (``Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct``): Qwen2-VL's model with its own vision tower.

Everything but the vision tower is ``models.qwen2_vl.modeling``: the Qwen2 decoder with
multimodal rotary positions, placeholder filling, the position table generation decodes with,
the checkpoint renames (published ``visual.*`` / ``model.*`` / ``lm_head.weight``, or transformers'
in-memory ``model.visual.*`` / ``model.language_model.*`` layout) and tied
embeddings (the 3B has no ``lm_head.weight``). What differs is data, not code: the vision config
carries ``tokens_per_second``, so ``get_rope_index`` places a video's temporal patches at their
time (``second_per_grid_ts``, one per video, passed to ``construct`` and ``generate`` under
transformers' name) instead of their index.
"""
from __future__ import annotations

from models.qwen2_5_vl.vision import Qwen2_5_VisionTransformer
from models.qwen2_vl.modeling import Qwen2VLForConditionalGeneration


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL with transformers' forward/generate arguments, ``second_per_grid_ts`` included."""

    vision_class = Qwen2_5_VisionTransformer
