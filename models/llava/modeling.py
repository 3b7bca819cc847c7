"""LLaVA-1.5 and PLLaVA: CLIP vision tower -> 2-layer GELU projector -> Llama/Mistral decoder.

The prompt holds one image token (``config.image_token_index``) per visual feature, as transformers'
processors expand each ``<image>`` to N tokens before tokenising; the token embeddings at those slots
are replaced, in order, by the projected features of the images/frames of the batch (transformers'
``masked_scatter``). :meth:`LlavaForConditionalGeneration.image_token_count` says how many tokens one
image (or, for PLLaVA, one video) needs.

Our Cell tree uses the published llava-hf key layout (``vision_tower.vision_model.*``,
``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.*``, ``image_newline``);
``checkpoint_rename_rules`` map the layout transformers 4's ``save_pretrained`` writes
(``model.language_model.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``lm_head.*``).
transformers 5's writes the published names, but without the CLIP tower's ``vision_model.`` level, which
:class:`models.clip_vision.CLIPVisionModel` puts back. PLLaVA's published weights keep PEFT LoRA wrappers
on the decoder's q/v projections; :meth:`PllavaForConditionalGeneration.checkpoint_hook` folds them in.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from models.checkpoint import CheckpointError, TensorRef
from models.clip_vision import CLIPVisionModel
from models import build_language_model, jit
from models.generation import GenerateOutput, causal_lm_loss, generate, to_numpy, to_tensor
from models.layers import Linear, gelu

if TYPE_CHECKING:
    from transformers import LlavaConfig

# text_config.model_type -> (module, class) of the native decoder
LANGUAGE_MODELS = {
    "llama": ("models.llama", "LlamaForCausalLM"),
    "mistral": ("models.llama", "LlamaForCausalLM"),
}
# transformers 4 save_pretrained layout -> published layout (ours)
SAVED_LAYOUT_RULES = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^model\.image_newline$", "image_newline"),
    (r"^lm_head\.", "language_model.lm_head."),
)


@dataclass
class LlavaOutput:
    """``logits`` (B, L, V) float32; ``loss`` when labels are given."""

    logits: Tensor
    loss: Optional[Tensor] = None


class LlavaMultiModalProjector(nn.Cell):
    def __init__(self, config: "LlavaConfig"):
        super().__init__()
        bias = getattr(config, "multimodal_projector_bias", True)
        text = config.text_config.hidden_size
        self.linear_1 = Linear(config.vision_config.hidden_size, text, bias=bias)
        self.linear_2 = Linear(text, text, bias=bias)
        if config.projector_hidden_act != "gelu":
            raise ValueError(f"projector_hidden_act {config.projector_hidden_act!r} not supported (gelu)")

    def construct(self, x: Tensor) -> Tensor:
        return self.linear_2(gelu(self.linear_1(x)))


class LlavaForConditionalGeneration(nn.Cell):
    """LLaVA-1.5 (llava-hf/llava-1.5-*, xtuner/llava-llama-3-8b-v1_1-transformers) with transformers' interface.

    ``pixel_values`` are (N, 3, H, W) images or (B, T, 3, H, W) frames; every image/frame is one
    ``<image>`` of the prompt, so a row of T frames holds T x :meth:`image_token_count` image tokens.
    """

    checkpoint_rename_rules = SAVED_LAYOUT_RULES

    def __init__(self, config: "LlavaConfig"):
        super().__init__()
        self.config = config
        if not isinstance(config.vision_feature_layer, int):
            raise NotImplementedError("a list of vision_feature_layer values is not supported")
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r}")
        if config.vision_config.model_type != "clip_vision_model":
            raise NotImplementedError(f"vision tower {config.vision_config.model_type!r} is not supported (CLIP)")
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = build_language_model(config.text_config, LANGUAGE_MODELS, "LLaVA")
        self.feature_layer = config.vision_feature_layer
        self.drop_cls = config.vision_feature_select_strategy == "default"
        self.use_jit = True  # compile the vision tower + projector; False to debug in PyNative
        self._encode_jit = None

    def get_input_embeddings(self) -> nn.Cell:
        return self.language_model.get_input_embeddings()

    def image_token_count(self) -> int:
        """Image tokens (features) per image: one per patch, plus the class token for "full"."""
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 + (0 if self.drop_cls else 1)

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) -> projected features (N, image_token_count, D)."""
        hidden = self.vision_tower(pixel_values, self.feature_layer)
        if self.drop_cls:
            hidden = hidden[:, 1:]
        return self.multi_modal_projector(hidden.astype(self.multi_modal_projector.linear_1.weight.dtype))

    def _encode(self, pixel_values: Tensor) -> Tensor:
        if not self.use_jit:
            return self.encode_images(pixel_values)
        if self._encode_jit is None:
            self._encode_jit = ms.jit(self.encode_images)
        return jit.call("llava.vision", self._encode_jit, pixel_values)

    def get_image_features(self, pixel_values, **kwargs) -> Tensor:
        """All images/frames of the batch -> their features concatenated in prompt order (F, D)."""
        pixel_values = to_tensor(pixel_values, ms.float32)
        if pixel_values.ndim == 5:
            pixel_values = pixel_values.reshape((-1,) + tuple(pixel_values.shape[2:]))
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (N, 3, H, W) or (B, T, 3, H, W), got {pixel_values.shape}")
        features = self._encode(pixel_values)
        return features.reshape(-1, features.shape[-1])

    def merge(self, features: Tensor, input_ids: np.ndarray) -> Tensor:
        """Prompt embeddings with the image-token slots replaced, in row-major order, by ``features`` (F, D)."""
        token = self.config.image_token_index
        slots = input_ids == token
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(f"Image features and image tokens do not match: tokens {int(slots.sum())}, "
                             f"features {features.shape[0]}")
        embeds = self.get_input_embeddings()(Tensor(np.where(slots, 0, input_ids).astype(np.int32)))
        index = np.where(slots, np.cumsum(slots.reshape(-1)).reshape(slots.shape) - 1, 0).astype(np.int32)
        placed = ops.gather(features.astype(embeds.dtype), Tensor(index.reshape(-1)), 0).reshape(embeds.shape)
        return ops.where(Tensor(slots)[..., None], placed, embeds)

    def _embeds(self, pixel_values, input_ids, image_sizes=None) -> tuple[Tensor, np.ndarray]:
        input_ids = to_numpy(input_ids).astype(np.int64)
        features = self.get_image_features(pixel_values, image_sizes=image_sizes)
        return self.merge(features, input_ids), input_ids

    def construct(self, pixel_values, input_ids, attention_mask=None, labels=None, image_sizes=None) -> LlavaOutput:
        """transformers' forward: logits (B, L, V) for a prompt whose image tokens are already expanded."""
        embeds, input_ids = self._embeds(pixel_values, input_ids, image_sizes)
        mask = np.ones(input_ids.shape, np.int32) if attention_mask is None else to_numpy(attention_mask)
        logits = self.language_model(inputs_embeds=embeds, attention_mask=Tensor(mask.astype(np.int32))).logits
        loss = None if labels is None else causal_lm_loss(logits, to_tensor(labels, ms.int32), shift=True)
        return LlavaOutput(logits=logits, loss=loss)

    def generate(self, pixel_values, input_ids, attention_mask=None, image_sizes=None,
                 return_dict_in_generate: bool = False, **generate_kwargs):
        """Token ids (N, S) int64: the prompt ids followed by the new tokens, as transformers returns them.

        Left-pad batched prompts (``attention_mask`` 0 on the padding). ``generate_kwargs`` go to
        :func:`models.generation.generate` (``max_new_tokens``, ``num_beams``, ``do_sample``, ...).
        """
        embeds, input_ids = self._embeds(pixel_values, input_ids, image_sizes)
        mask = None if attention_mask is None else to_numpy(attention_mask).astype(np.int32)
        out: GenerateOutput = generate(self.language_model, input_ids=input_ids, inputs_embeds=embeds,
                                       attention_mask=mask, **generate_kwargs)
        return out if return_dict_in_generate else out.sequences


# ----------------------------------------------------------------------------- PLLaVA


def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(out, in) averaging matrix of torch's adaptive average pooling along one axis.

    Bin i covers [floor(i*in/out), ceil((i+1)*in/out)). A box average is the product of the
    per-axis averages, so 3-D adaptive pooling is three of these matmuls.
    """
    matrix = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool3d(x: Tensor, output_shape: Sequence[int]) -> Tensor:
    """``torch.nn.AdaptiveAvgPool3d`` over axes 1-3 of channels-last (B, T, H, W, D) -> (B, T', H', W', D)."""
    b, t, h, w, d = x.shape
    t_out, h_out, w_out = output_shape
    pt = Tensor(adaptive_pool_matrix(t, t_out)).astype(x.dtype)
    ph = Tensor(adaptive_pool_matrix(h, h_out)).astype(x.dtype)
    pw = Tensor(adaptive_pool_matrix(w, w_out)).astype(x.dtype)
    x = ops.matmul(pt, x.reshape(b, t, h * w * d)).reshape(b, t_out, h, w * d)
    x = ops.matmul(ph, x).reshape(b, t_out, h_out, w, d)
    x = ops.matmul(pw, x.reshape(b * t_out * h_out, w, d))
    return x.reshape(b, t_out, h_out, w_out, d)


_LORA = re.compile(r"^(.*)\.base_layer\.weight$")


class PllavaForConditionalGeneration(LlavaForConditionalGeneration):
    """PLLaVA (ermu2001/pllava-7b/13b/34b): LLaVA whose per-frame features are pooled over time and space.

    ``pixel_values`` (B, T, 3, H, W): each frame's projected features (24 x 24 for 336 px) form a
    (T, 24, 24) grid per video, adaptive-average-pooled to ``pooling_shape`` (e.g. (4, 12, 12)) and
    flattened (t, h, w) to T'*12*12 tokens; the prompt holds one image token per pooled feature
    (PLLaVA's single ``<image>`` expanded, see :meth:`image_token_count`). ``pooling_shape`` starts
    from the config and may be set per run (PLLaVA's own scripts use (num_frames, 12, 12)).

    LoRA: published weights carry ``...q_proj.base_layer.weight`` + ``lora_A``/``lora_B``; they are merged
    as W + (lora_alpha / r) B A with ``lora_alpha`` from config.json (key ``lora_alpha``) or 4, the
    value PLLaVA's demo and evaluation scripts load these checkpoints with.
    """

    checkpoint_rename_rules = SAVED_LAYOUT_RULES + ((r"^language_model\.base_model\.model\.", "language_model."),)
    DEFAULT_LORA_ALPHA = 4.0

    def __init__(self, config: "LlavaConfig"):
        super().__init__(config)
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        self.frame_shape = tuple(getattr(config, "frame_shape", None) or (side, side))
        self.pooling_shape = tuple(getattr(config, "pooling_shape", None) or (1,) + self.frame_shape)
        self.use_pooling = bool(getattr(config, "use_pooling", True))
        if getattr(config, "pooling_method", "avg") != "avg":
            raise NotImplementedError(f"pooling_method {config.pooling_method!r} is not supported (avg)")
        self.lora_alpha = float(getattr(config, "lora_alpha", self.DEFAULT_LORA_ALPHA))
        self._pool_jit, self._pool_shape = None, None  # compiled encode_videos and the shape it was built for

    def image_token_count(self, num_frames: Optional[int] = None) -> int:
        """Image tokens per video: T' x H' x W' of ``pooling_shape`` (T x per-frame tokens without pooling)."""
        if not self.use_pooling:
            return (num_frames or 1) * super().image_token_count()
        t, h, w = self.pooling_shape
        return t * h * w

    def encode_videos(self, pixel_values: Tensor, batch: int) -> Tensor:
        """(B*T, 3, H, W) frames -> pooled features (B, T'*H'*W', D)."""
        features = self.encode_images(pixel_values)
        if not self.use_pooling:
            return features.reshape(batch, -1, features.shape[-1])
        grid = features.reshape((batch, -1) + self.frame_shape + (features.shape[-1],))
        pooled = adaptive_avg_pool3d(grid, self.pooling_shape)
        return pooled.reshape(batch, -1, pooled.shape[-1])

    def get_image_features(self, pixel_values, **kwargs) -> Tensor:
        """(B, T, 3, H, W) videos (or (T, 3, H, W), one video) -> pooled features in prompt order (F, D)."""
        pixel_values = to_tensor(pixel_values, ms.float32)
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[None]
        if pixel_values.ndim != 5:
            raise ValueError(f"pixel_values must be (B, T, 3, H, W), got {pixel_values.shape}")
        batch = pixel_values.shape[0]
        frames = pixel_values.reshape((-1,) + tuple(pixel_values.shape[2:]))
        if self.use_jit:
            if self._pool_shape != self.pooling_shape:  # the shape is baked into the compiled graph
                self._pool_jit, self._pool_shape = ms.jit(self.encode_videos), self.pooling_shape
            features = jit.call("pllava.vision", self._pool_jit, frames, batch)
        else:
            features = self.encode_videos(frames, batch)
        return features.reshape(-1, features.shape[-1])

    def checkpoint_hook(self, tensors: dict[str, TensorRef]) -> None:
        """Fold PEFT LoRA wrappers (``base_layer`` + ``lora_A``/``lora_B`` ``.default``) into plain weights."""
        for name in [n for n in tensors if _LORA.match(n)]:
            prefix = _LORA.match(name).group(1)
            a_name, b_name = f"{prefix}.lora_A.default.weight", f"{prefix}.lora_B.default.weight"
            if a_name not in tensors or b_name not in tensors:
                raise CheckpointError(f"{name} has no {a_name} / {b_name} LoRA pair")
            base, lora_a, lora_b = tensors.pop(name), tensors.pop(a_name), tensors.pop(b_name)
            scale = self.lora_alpha / lora_a.shape[0]

            def read(base=base, lora_a=lora_a, lora_b=lora_b, scale=scale) -> np.ndarray:
                delta = lora_b.read().astype(np.float32) @ lora_a.read().astype(np.float32)
                return base.read().astype(np.float32) + np.float32(scale) * delta

            tensors[f"{prefix}.weight"] = TensorRef(base.shape, read)


def build_llava(config: "LlavaConfig") -> LlavaForConditionalGeneration:
    """The registry's constructor for model_type "llava": PLLaVA when the config has PLLaVA's pooling keys."""
    if getattr(config, "pooling_shape", None) is not None:
        return PllavaForConditionalGeneration(config)
    return LlavaForConditionalGeneration(config)
