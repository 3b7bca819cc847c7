"""BLIP-2 (and VideoBLIP) video captioner: vision encoder -> Q-Former -> projection -> OPT or T5.

Video is a run-time property, not a weight: ``pixel_values`` (B, T, 3, H, W) go through
the vision encoder as B*T images, their tokens are concatenated per video into
(B, T*N, D), and the one set of query tokens cross-attends over all of them (no
temporal embedding, no pooling). T=1 or 4-D (B, 3, H, W) input is plain image BLIP-2.

Cross-attention over a set of tokens cannot tell frame order, so such a model cannot
tell left from right or growing from shrinking. ``config.num_frame_positions = M``
(not in published checkpoints; the bundled demo model uses it) adds a learned
embedding of each frame's relative time to its patch embeddings, before the vision
encoder, so the encoder's layers can combine where with when: frame t of T gets row
round(t * (M - 1) / (T - 1)) of an (M, D) table, so any frame count maps onto it.

``config.frame_query_groups = true`` (also a project extension) splits the queries into
T equal groups for a T-frame video: group t cross-attends to frame t's tokens only, and
self-attention among all queries compares the frames. So the language model gets one
group of outputs per frame, in frame order, where it can see how the frames differ.
Q must be divisible by T (a 32-query model takes 1, 2, 4, 8, 16 or 32 frames).

``vision_config.temporal_patch_size = k`` (also a project extension; the bundled demo
model uses all three, with k = 2) makes each patch span k consecutive frames (tubelets, as
in Qwen2-VL and ViViT), so a T-frame clip is T / k steps for everything after the patch
embedding (frame times, query groups): where the shape moved between two frames is then
something a patch shows, like its colour.

The query outputs reach the language model in one of two ways, as transformers does:

* ``config.image_token_index`` set (transformers >= 4.47 checkpoints/processors): the
  prompt holds ``num_query_tokens`` image placeholder tokens per row, whose embeddings
  are replaced by the query outputs in order. A prompt without any placeholder gets the
  queries prepended instead, as below.
* no ``image_token_index`` (earlier BLIP-2 checkpoints, VideoBLIP): the queries are
  prepended to the prompt embeddings (decoder-only) or to the T5 encoder input, with
  attention-mask ones in front.

Frames are (B, T, C, H, W); VideoBLIP's own processing yields (B, C, T, H, W), so
permute such input first. The image/video encoder runs under ``ms.jit`` (set
``model.use_jit = False`` to debug it in PyNative).

Parameter names equal transformers' ``Blip2ForConditionalGeneration``, so published
``Salesforce/blip2-*`` and ``kpyu/video-blip-*`` weights load by name; LAVIS's names
(its ``.pth`` training files) are renamed to them on load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from models.blip2.qformer import Blip2QFormerModel, lavis_qformer_rules
from models.blip2.vision import Blip2VisionModel, merge_q_v_bias, temporal_patch_size
from models.checkpoint import TensorRef
from models import build_language_model
from models.generation import GenerateOutput, causal_lm_loss, generate, to_numpy, to_tensor
from models.layers import Linear, zeros_parameter

if TYPE_CHECKING:
    from transformers import Blip2Config

# text_config.model_type -> (module, class) of the native language model
LANGUAGE_MODELS = {
    "opt": ("models.opt", "OPTForCausalLM"),
    "t5": ("models.t5", "T5ForConditionalGeneration"),
}


# LAVIS's names (its .pth training files) -> transformers' (as transformers' own conversion maps them)
LAVIS_RULES = (
    *lavis_qformer_rules("Qformer", "qformer"),
    (r"^ln_vision\.", "vision_model.post_layernorm."),
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm([12])\.", r"vision_model.encoder.layers.\1.layer_norm\2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.", r"vision_model.encoder.layers.\1.self_attn."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^(?:opt|t5)_proj\.", "language_projection."),
    (r"^(?:opt|t5)_model\.", "language_model."),
)


@dataclass
class Blip2Output:
    """``logits`` (B, L, V) of the language model (decoder logits for T5); ``loss`` when labels are given."""

    logits: Tensor
    loss: Optional[Tensor] = None


class Blip2ForConditionalGeneration(nn.Cell):
    """Image/video captioner with transformers' forward/generate interface (inference and training)."""

    keep_in_fp32_modules = ("query_tokens", "qformer")
    checkpoint_rename_rules = LAVIS_RULES
    tied_weights_keys = ("qformer.embeddings.position_ids",)  # a LAVIS buffer, not a parameter

    def __init__(self, config: "Blip2Config"):
        super().__init__()
        self.config = config
        qformer_size = config.qformer_config.hidden_size
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = zeros_parameter((1, config.num_query_tokens, qformer_size))
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self.language_projection = Linear(qformer_size, config.text_config.hidden_size)
        self.language_model = build_language_model(config.text_config, LANGUAGE_MODELS, "BLIP-2")
        positions = int(getattr(config, "num_frame_positions", 0) or 0)
        self.frame_position_embedding = (zeros_parameter((positions, config.vision_config.hidden_size))
                                         if positions else None)
        self.frame_query_groups = bool(getattr(config, "frame_query_groups", False))
        self.temporal_patch_size = temporal_patch_size(config.vision_config)
        self.tokens_per_frame = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1
        self.is_decoder_only = bool(config.use_decoder_only_language_model)
        self.use_jit = True  # compile the image/video encoder (several times faster); False to debug
        # Frames per compiled vision-encoder call: one static shape compiles once, and graph mode's
        # memory (it keeps every activation on CPU) is bounded by the chunk, not by batch x frames.
        self.frame_chunk = 8
        self._vision_jit = None
        self._query_jit = None

    def checkpoint_hook(self, tensors: dict[str, TensorRef]) -> None:
        """Accept LAVIS-style separate q/v biases in the vision attention."""
        merge_q_v_bias(tensors)

    def get_input_embeddings(self) -> nn.Cell:
        """The language model's token embedding table."""
        return self.language_model.get_input_embeddings()

    def get_image_features(self, pixel_values) -> Tensor:
        """(B, 3, H, W) images or (B, T, 3, H, W) videos -> (B, num_query_tokens, text hidden) LM inputs."""
        pixel_values = to_tensor(pixel_values, ms.float32)
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None]
        elif pixel_values.ndim != 5:
            raise ValueError(f"pixel_values must be (B, 3, H, W) or (B, T, 3, H, W), got {pixel_values.shape}")
        size = self.config.vision_config.image_size
        if tuple(pixel_values.shape[-3:]) != (3, size, size):
            raise ValueError(f"frames must be 3 x {size} x {size}, got {tuple(pixel_values.shape[-3:])}")
        pixel_values = self.tubelets(pixel_values)
        batch, frames = pixel_values.shape[:2]
        pixel_values = pixel_values.reshape((batch * frames,) + tuple(pixel_values.shape[2:]))
        if self.frame_query_groups and self.config.num_query_tokens % frames:
            k = self.temporal_patch_size
            unit = f"{k}-frame tubelet" if k > 1 else "frame"
            suggest = k * (getattr(self.config, "num_frame_positions", 0) or self.config.num_query_tokens)
            raise ValueError(f"this model's {self.config.num_query_tokens} queries are grouped per {unit} "
                             f"(frame_query_groups), so the {unit} count must divide them; got {frames * k} "
                             f"frames: sample {suggest} (--num_frames)")
        times = self.frame_times(batch, frames)
        if not self.use_jit:
            return self.encode_frames(pixel_values, batch, times)
        if self._vision_jit is None:
            self._vision_jit = ms.jit(self.vision_model.construct)
            self._query_jit = ms.jit(self.query_features)
        tokens = self._chunked_vision(pixel_values, times)
        return self._query_jit(tokens.reshape(batch, -1, tokens.shape[2]))

    def tubelets(self, clips: Tensor) -> Tensor:
        """(B, T, 3, H, W) -> (B, T / k, 3k, H, W): each k consecutive frames stacked on the channels
        (``temporal_patch_size`` k; unchanged for k = 1). A single image is repeated k times, as Qwen2-VL does."""
        k = self.temporal_patch_size
        if k == 1:
            return clips
        batch, frames = clips.shape[:2]
        if frames == 1:
            clips = ops.tile(clips, (1, k, 1, 1, 1))
            frames = k
        if frames % k:
            raise ValueError(f"this model's vision encoder takes {k} frames per patch (vision_config."
                             f"temporal_patch_size), so the frame count must be a multiple of {k}; got {frames} "
                             f"frames: sample {frames + k - frames % k} (--num_frames)")
        return clips.reshape((batch, frames // k, 3 * k) + tuple(clips.shape[3:]))

    def _chunked_vision(self, frames: Tensor, times: Optional[Tensor]) -> Tensor:
        """Vision tokens of (N, C, H, W) frames or tubelets, ``frame_chunk`` per compiled call (the last padded)."""
        n, chunk = frames.shape[0], self.frame_chunk
        pad = (-n) % chunk
        if pad:
            frames = ops.concat((frames, ops.zeros((pad,) + tuple(frames.shape[1:]), frames.dtype)), axis=0)
            if times is not None:
                times = ops.concat((times, ops.zeros((pad, times.shape[1]), times.dtype)), axis=0)
        if times is None:
            tokens = [self._vision_jit(frames[i:i + chunk]) for i in range(0, n + pad, chunk)]
        else:
            tokens = [self._vision_jit(frames[i:i + chunk], times[i:i + chunk]) for i in range(0, n + pad, chunk)]
        return ops.concat(tokens, axis=0)[:n]

    def encode_frames(self, frames: Tensor, batch: int, times: Optional[Tensor] = None) -> Tensor:
        """(batch*T, 3, H, W) frames -> (batch, T*N, D) tokens -> Q-Former -> projection."""
        tokens = self.vision_model(frames, times)
        return self.query_features(tokens.reshape(batch, -1, tokens.shape[2]))

    def frame_times(self, batch: int, frames: int) -> Optional[Tensor]:
        """(batch*frames, D) frame-time embeddings, video after video; None without the table."""
        if self.frame_position_embedding is None:
            return None
        last = self.frame_position_embedding.shape[0] - 1
        rows = np.round(np.arange(frames) * last / max(frames - 1, 1)).astype(np.int32)
        return ops.gather(self.frame_position_embedding, Tensor(np.tile(rows, batch)), 0)

    def query_features(self, tokens: Tensor) -> Tensor:
        """(batch, T*N, D) vision tokens of all frames -> one set of queries (grouped per frame with
        ``frame_query_groups``) -> LM-width features."""
        batch = tokens.shape[0]
        groups = tokens.shape[1] // self.tokens_per_frame if self.frame_query_groups else 1
        queries = ops.broadcast_to(self.query_tokens, (batch,) + tuple(self.query_tokens.shape[1:]))
        query_output = self.qformer(queries, tokens, groups)
        return self.language_projection(query_output.astype(self.language_projection.weight.dtype))

    def _merge(self, image_embeds: Tensor, input_ids: np.ndarray, attention_mask: Optional[np.ndarray]):
        """LM input embeddings and mask with the query outputs placed (placeholders) or prepended."""
        batch, num_query = image_embeds.shape[:2]
        if input_ids.shape[0] != batch:
            raise ValueError(f"{input_ids.shape[0]} prompts for {batch} images/videos")
        if attention_mask is None:
            attention_mask = np.ones(input_ids.shape, np.int64)
        embeds = self.get_input_embeddings()(Tensor(input_ids.astype(np.int32)))
        image_embeds = image_embeds.astype(embeds.dtype)
        token = self.config.image_token_index
        slots = input_ids == token if token is not None else np.zeros(input_ids.shape, bool)
        if slots.any():
            counts = slots.sum(axis=1)
            if (counts != num_query).any():
                raise ValueError(f"each prompt needs {num_query} image tokens ({token}), got {counts.tolist()}")
            index = np.cumsum(slots, axis=1) - 1 + np.arange(batch)[:, None] * num_query
            index = np.where(slots, index, 0).reshape(-1).astype(np.int32)
            flat = ops.gather(image_embeds.reshape(batch * num_query, -1), Tensor(index), 0)
            placed = flat.reshape(embeds.shape)
            embeds = ops.where(Tensor(slots)[..., None], placed, embeds)
            return embeds, attention_mask
        embeds = ops.concat((image_embeds, embeds), axis=1)
        mask = np.concatenate([np.ones((batch, num_query), attention_mask.dtype), attention_mask], axis=1)
        return embeds, mask

    def construct(self, pixel_values, input_ids, attention_mask=None, decoder_input_ids=None,
                  decoder_attention_mask=None, labels=None) -> Blip2Output:
        """transformers' ``Blip2ForConditionalGeneration.forward``; numpy or Tensor inputs."""
        image_embeds = self.get_image_features(pixel_values)
        embeds, mask = self._merge(image_embeds, to_numpy(input_ids), to_numpy(attention_mask))
        mask = Tensor(mask.astype(np.int32))
        if self.is_decoder_only:
            logits = self.language_model(inputs_embeds=embeds, attention_mask=mask).logits
            loss = None
            if labels is not None:
                labels = to_tensor(labels, ms.int32)
                loss = causal_lm_loss(logits[:, -labels.shape[1]:], labels, shift=True)
            return Blip2Output(logits=logits, loss=loss)
        extra = {}
        if decoder_attention_mask is not None:
            extra["decoder_attention_mask"] = to_tensor(decoder_attention_mask, ms.int32)
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask,
                                  decoder_input_ids=to_tensor(decoder_input_ids, ms.int32),
                                  labels=to_tensor(labels, ms.int32), **extra)
        return Blip2Output(logits=out.logits, loss=out.loss)

    def generate(self, pixel_values, input_ids=None, attention_mask=None, return_dict_in_generate: bool = False,
                 **generate_kwargs):
        """Caption token ids, as transformers' ``Blip2ForConditionalGeneration.generate``.

        Returns (N, S) int64 ids: for OPT the prompt ids followed by the new tokens, for T5
        the decoder start token followed by the new tokens. ``generate_kwargs`` go to
        :func:`models.generation.generate` (``max_new_tokens``, ``num_beams``,
        ``num_return_sequences``, ``min_length``, ``length_penalty``, ``do_sample``, ...).
        With ``return_dict_in_generate`` the :class:`GenerateOutput` (with beam scores) is returned.
        """
        image_embeds = self.get_image_features(pixel_values)
        batch = image_embeds.shape[0]
        if input_ids is None:
            start = [self.config.image_token_index] * self.config.num_query_tokens \
                if self.config.image_token_index is not None else []
            if self.is_decoder_only:
                start.append(self.config.text_config.bos_token_id)
            if not start:
                raise ValueError("give input_ids (a prompt) for an encoder-decoder model without image tokens")
            input_ids = np.tile(np.asarray(start, np.int64), (batch, 1))
            attention_mask = None
        input_ids = to_numpy(input_ids).astype(np.int64)
        embeds, mask = self._merge(image_embeds, input_ids, to_numpy(attention_mask))
        prompt = {"input_ids": input_ids} if self.is_decoder_only else {}
        out: GenerateOutput = generate(self.language_model, inputs_embeds=embeds, attention_mask=mask,
                                       **prompt, **generate_kwargs)
        return out if return_dict_in_generate else out.sequences
