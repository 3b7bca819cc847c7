"""Video-LLaMA's vision-language branch: frames -> BLIP-2 queries per frame -> video Q-Former -> LLaMA.

Per frame, BLIP-2's ViT (with its final LayerNorm, LAVIS' ``ln_vision``) and its image
Q-Former give ``num_query_tokens`` (32) query outputs. Frame t's queries get row t of a
learned frame position table (``max_frame_pos`` rows, so at most that many frames), and
the T x 32 outputs of a video, flattened, are what a second, 2-layer Q-Former
(cross-attention in every layer, its own 32 queries) attends over. ``llama_proj`` maps its
outputs into the LLaMA embedding space, where they replace the video placeholder slots
of the prompt (``<Video><ImageHere></Video>`` in Video-LLaMA's conversation template).

Nobody publishes these weights in one place, so a model is composed from what users have,
each part loaded by name from its own source and checked complete:

* :class:`FrameQueries` from a Hugging Face BLIP-2 folder (``vision_model.*``,
  ``query_tokens``, ``qformer.*``; its language model is not read). Video-LLaMA froze
  BLIP-2's ViT and Q-Former (from ``blip2_pretrained_flant5xxl.pth``), so a
  ``Salesforce/blip2-flan-t5-xxl`` folder holds the same weights.
* :class:`VideoQueries` from a Video-LLaMA training ``.pth`` (its ``"model"`` entry), whose
  LAVIS names (``video_Qformer.bert.encoder.layer.N.attention.self.query``...) are mapped
  onto our Q-Former's (``video_Qformer.encoder.layer.N.attention.attention.query``...).
* :class:`VideoLlamaLanguageModel` from a Hugging Face LLaMA (Vicuna, LLaMA-2-chat) folder.

Buffers that some of these files carry (``*.position_ids``, rotary ``inv_freq``) are not
parameters and are dropped. Frames are (B, T, 3, H, W); Video-LLaMA's own processing
gives (B, 3, T, H, W), so permute such input first.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from safetensors.numpy import save_file
from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, LlamaConfig

from models.blip2.qformer import Blip2QFormerModel, lavis_qformer_rules
from models.blip2.vision import Blip2VisionModel, merge_q_v_bias
from models.checkpoint import CheckpointError, TensorRef, load_checkpoint, read_config, weight_files
from models.generation import GenerateOutput, causal_lm_loss, generate, to_numpy, to_tensor
from models.layers import Embedding, Linear, zeros_parameter
from models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

# Marks the prompt slots that the video features fill. Not a vocabulary id, so no token of the
# prompt's own text can collide with it (Video-LLaMA's added <ImageHere> token has no embedding row).
VIDEO_TOKEN_INDEX = -200
PLACEHOLDER = "<ImageHere>"

# The video Q-Former of Video-LLaMA: bert-base-uncased cut to 2 layers.
VIDEO_QFORMER_DEFAULTS = dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
                              intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-12)

_BUFFER = re.compile(r"(^|\.)(position_ids|inv_freq)$")


def drop_buffers(tensors: dict[str, TensorRef]) -> None:
    """Remove non-parameter buffers (BERT ``position_ids``, rotary ``inv_freq``) saved alongside weights."""
    for name in [n for n in tensors if _BUFFER.search(n)]:
        del tensors[name]


@dataclass
class VideoLlamaConfig:
    """Sizes of every part; built by :func:`read_video_llama_config` from the three sources' configs."""

    vision_config: Blip2VisionConfig
    qformer_config: Blip2QFormerConfig
    num_query_tokens: int
    video_qformer_config: Blip2QFormerConfig
    text_config: LlamaConfig
    num_video_query_tokens: int = 32
    max_frame_pos: int = 32


@dataclass
class VideoLlamaSources:
    """Where each part's weights are: a BLIP-2 folder, a Video-LLaMA .pth and a LLaMA folder."""

    blip2_model: Path
    checkpoint: Path
    llama_model: Path


_SOURCE_KINDS = {
    "blip2_model": "Hugging Face BLIP-2 folder (e.g. Salesforce/blip2-flan-t5-xxl) for the ViT and image Q-Former",
    "checkpoint": "Video-LLaMA .pth (e.g. finetune-vicuna7b-v2.pth) or safetensors file with the video Q-Former "
                  "and llama_proj",
    "llama_model": "Hugging Face LLaMA folder (e.g. Vicuna-7B, Llama-2-7b-chat-hf) the .pth was trained with",
}


def read_sources(folder: str | Path, checkpoint: str | Path | None = None) -> VideoLlamaSources:
    """The three sources named by ``folder``/config.json (relative paths are relative to the folder).

    ``checkpoint`` replaces the config's Video-LLaMA ``.pth`` (e.g. to try another fine-tune).
    """
    folder = Path(folder)
    raw = read_config(folder)
    if raw.get("model_type") != "video_llama":
        raise CheckpointError(f"{folder}/config.json has model_type {raw.get('model_type')!r}, not 'video_llama'")
    paths = {}
    for key in ("blip2_model", "checkpoint", "llama_model"):
        if key == "checkpoint" and checkpoint is not None:
            paths[key] = Path(checkpoint).expanduser().resolve()
        elif raw.get(key):
            paths[key] = (folder / Path(raw[key]).expanduser()).resolve()
        else:
            raise CheckpointError(f"{folder}/config.json needs {key!r}: the path of the {_SOURCE_KINDS[key]}")
        path = paths[key]
        if not path.exists():
            raise CheckpointError(f"{key} {path} (from {folder}/config.json) does not exist: it should be the "
                                  f"{_SOURCE_KINDS[key]}")
    if not paths["checkpoint"].is_file():
        raise CheckpointError(f"checkpoint {paths['checkpoint']} must be a file (a Video-LLaMA .pth, or the "
                              f"{VideoLlamaForConditionalGeneration.weights_file} of a trained model)")
    for key in ("blip2_model", "llama_model"):
        weight_files(paths[key])  # fail on a folder without weights before building a large model
    return VideoLlamaSources(**paths)


def read_video_llama_config(folder: str | Path, sources: VideoLlamaSources) -> VideoLlamaConfig:
    """Part sizes: BLIP-2's and LLaMA's from their own config.json, the video Q-Former's from ours."""
    raw = read_config(folder)
    blip2 = Blip2Config.from_dict(read_config(sources.blip2_model))
    text = LlamaConfig.from_dict(read_config(sources.llama_model))
    if text.model_type != "llama":
        raise CheckpointError(f"llama_model {sources.llama_model} is a {text.model_type!r} model, not 'llama'")
    video = {**VIDEO_QFORMER_DEFAULTS, **(raw.get("video_qformer") or {})}
    # cross-attention in every layer, over the image Q-Former's outputs
    video.update(cross_attention_frequency=1, encoder_hidden_size=blip2.qformer_config.hidden_size)
    return VideoLlamaConfig(
        vision_config=blip2.vision_config, qformer_config=blip2.qformer_config,
        num_query_tokens=blip2.num_query_tokens, video_qformer_config=Blip2QFormerConfig(**video),
        text_config=text, num_video_query_tokens=int(raw.get("num_video_query_tokens", 32)),
        max_frame_pos=int(raw.get("max_frame_pos", 32)))


class FrameQueries(nn.Cell):
    """BLIP-2's image half: (N, 3, H, W) frames -> ViT -> image Q-Former -> (N, num_query_tokens, H_q)."""

    keep_in_fp32_modules = ("query_tokens", "qformer")

    def __init__(self, config: VideoLlamaConfig):
        super().__init__()
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = zeros_parameter((1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel(config.qformer_config)

    def checkpoint_hook(self, tensors: dict[str, TensorRef]) -> None:
        """Read only the vision half of a BLIP-2 folder; accept LAVIS-style q/v biases."""
        for name in [n for n in tensors if n.startswith(("language_model.", "language_projection."))]:
            del tensors[name]
        merge_q_v_bias(tensors)

    def construct(self, frames: Tensor) -> Tensor:
        tokens = self.vision_model(frames)
        queries = ops.broadcast_to(self.query_tokens, (tokens.shape[0],) + tuple(self.query_tokens.shape[1:]))
        return self.qformer(queries, tokens)


class VideoQueries(nn.Cell):
    """Video-LLaMA's trained part: (B, T, Q, H_q) frame queries + frame positions -> video Q-Former -> LLM width.

    Parameter names are the ``.pth``'s after the LAVIS -> transformers Q-Former renames below.
    """

    keep_in_fp32_modules = ("video_query_tokens", "video_frame_position_embedding", "video_Qformer")
    checkpoint_rename_rules = lavis_qformer_rules("video_Qformer", "video_Qformer")

    def __init__(self, config: VideoLlamaConfig):
        super().__init__()
        width = config.video_qformer_config.hidden_size
        self.video_query_tokens = zeros_parameter((1, config.num_video_query_tokens, width))
        self.video_frame_position_embedding = Embedding(config.max_frame_pos, config.qformer_config.hidden_size)
        self.video_Qformer = Blip2QFormerModel(config.video_qformer_config)
        self.llama_proj = Linear(width, config.text_config.hidden_size)

    def checkpoint_hook(self, tensors: dict[str, TensorRef]) -> None:
        drop_buffers(tensors)

    def construct(self, frame_queries: Tensor) -> Tensor:
        batch, frames, queries, width = frame_queries.shape
        positions = self.video_frame_position_embedding.weight[:frames]
        tokens = (frame_queries + positions[None, :, None, :]).reshape(batch, frames * queries, width)
        video_queries = ops.broadcast_to(self.video_query_tokens, (batch,) + tuple(self.video_query_tokens.shape[1:]))
        hidden = self.video_Qformer(video_queries, tokens)
        return self.llama_proj(hidden.astype(self.llama_proj.weight.dtype))


def _arrays(cell: nn.Cell, exclude: tuple[str, ...]) -> dict[str, np.ndarray]:
    """A cell's parameters as numpy arrays by name (bfloat16 as float32, which numpy lacks)."""
    return {name: np.ascontiguousarray((param.astype(ms.float32) if param.dtype == ms.bfloat16 else param).asnumpy())
            for name, param in cell.parameters_and_names() if not name.endswith(exclude)}


class VideoLlamaLanguageModel(LlamaForCausalLM):
    """The LLaMA decoder; older LLaMA/Vicuna ``.bin`` folders also store rotary ``inv_freq`` buffers."""

    def checkpoint_hook(self, tensors: dict[str, TensorRef]) -> None:
        drop_buffers(tensors)


@dataclass
class VideoLlamaOutput:
    """``logits`` (B, L, V) of the language model over the prompt with the video in place; ``loss`` with labels."""

    logits: Tensor
    loss: Optional[Tensor] = None


def build_prompt_ids(tokenizer, prompt: str, num_video_tokens: int) -> list[int]:
    """Token ids of ``prompt`` with its one ``<ImageHere>`` replaced by ``num_video_tokens`` video slots.

    As Video-LLaMA's chat does: the text before the placeholder is tokenized with the
    tokenizer's special tokens (LLaMA's BOS), the text after it without.
    """
    parts = prompt.split(PLACEHOLDER)
    if len(parts) != 2:
        raise ValueError(f"the prompt must hold {PLACEHOLDER} exactly once, got {prompt!r}")
    before = tokenizer(parts[0])["input_ids"]
    after = tokenizer(parts[1], add_special_tokens=False)["input_ids"]
    return list(before) + [VIDEO_TOKEN_INDEX] * num_video_tokens + list(after)


class VideoLlamaForConditionalGeneration(nn.Cell):
    """Video-LLaMA's vision-language branch with a transformers-like forward/generate interface.

    Training (``pipeline.training.train``) uses the interface BLIP-2's decoder-only path has:
    ``get_image_features`` (the video's LLM inputs), ``_merge`` (them placed in the prompt) and
    ``language_model``; the prompt comes from :meth:`prompt_ids`, and what trains by default is
    ``trainable_prefixes``, the part Video-LLaMA itself trains.
    """

    is_decoder_only = True
    trainable_prefixes = ("video_encoder.",)
    weights_file = "video_llama.safetensors"

    def __init__(self, config: VideoLlamaConfig):
        super().__init__()
        self.config = config
        self.sources: Optional[VideoLlamaSources] = None  # set by from_folder; save_pretrained names them
        self.frame_encoder = FrameQueries(config)
        self.video_encoder = VideoQueries(config)
        self.language_model = VideoLlamaLanguageModel(config.text_config)
        self.use_jit = True  # compile the frame and video encoders; False to debug them in PyNative
        self.frame_chunk = 8  # frames per compiled frame-encoder call: one static shape, bounded memory
        self._frame_jit = None
        self._video_jit = None

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: str = "float32",
                    weights: str | Path | None = None) -> "VideoLlamaForConditionalGeneration":
        """Build from our config.json and load each part from the source it names.

        ``weights``: a Video-LLaMA ``.pth`` used instead of the config's ``checkpoint``.
        """
        sources = read_sources(folder, checkpoint=weights)
        model = cls(read_video_llama_config(folder, sources))
        load_checkpoint(model.frame_encoder, sources.blip2_model, dtype=dtype)
        load_checkpoint(model.video_encoder, sources.checkpoint, dtype=dtype)
        load_checkpoint(model.language_model, sources.llama_model, dtype=dtype)
        model.sources = sources
        model.set_train(False)
        logger.info("Video-LLaMA from %s: BLIP-2 %s, weights %s, LLaMA %s", folder, sources.blip2_model,
                    sources.checkpoint, sources.llama_model)
        return model

    def save_pretrained(self, folder: str | Path, tokenizer=None, save_language_model: bool = False,
                        exclude: tuple[str, ...] = ()) -> Path:
        """A Video-LLaMA folder of this model: the video branch in ``video_llama.safetensors`` (our names)
        and a config.json naming it and the BLIP-2 folder this model was loaded from.

        ``save_language_model``: also write the language model (config, weights and ``tokenizer``) to
        ``folder/llama`` (after LLM training); otherwise config.json names the LLaMA folder loaded from.
        ``exclude``: parameter name suffixes left out (e.g. LoRA A/B merged into their weights).
        """
        if self.sources is None:
            raise ValueError("save_pretrained needs a model built by from_folder (it names the BLIP-2 source)")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(_arrays(self.video_encoder, exclude), str(folder / self.weights_file), metadata={"format": "pt"})
        llama = str(self.sources.llama_model)
        if save_language_model:
            (folder / "llama").mkdir(exist_ok=True)
            save_file(_arrays(self.language_model, exclude), str(folder / "llama" / "model.safetensors"),
                      metadata={"format": "pt"})
            self.config.text_config.save_pretrained(folder / "llama")
            if tokenizer is not None:
                tokenizer.save_pretrained(folder / "llama")
            llama = "llama"
        video = self.config.video_qformer_config
        config = {"model_type": "video_llama", "blip2_model": str(self.sources.blip2_model),
                  "checkpoint": self.weights_file, "llama_model": llama,
                  "num_video_query_tokens": self.config.num_video_query_tokens,
                  "max_frame_pos": self.config.max_frame_pos,
                  "video_qformer": {key: getattr(video, key) for key in VIDEO_QFORMER_DEFAULTS}}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return folder

    def get_input_embeddings(self) -> nn.Cell:
        return self.language_model.get_input_embeddings()

    def prompt_ids(self, tokenizer, prompt: str) -> list[int]:
        """The prompt's ids with the video slots at its ``<ImageHere>`` (see :func:`build_prompt_ids`)."""
        return build_prompt_ids(tokenizer, prompt, self.config.num_video_query_tokens)

    def get_video_features(self, pixel_values) -> Tensor:
        """(B, T, 3, H, W) videos or (B, 3, H, W) images (T=1) -> (B, num_video_query_tokens, LLM hidden)."""
        pixel_values = to_tensor(pixel_values, ms.float32)
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None]
        if pixel_values.ndim != 5:
            raise ValueError(f"pixel_values must be (B, T, 3, H, W) or (B, 3, H, W), got {pixel_values.shape}")
        batch, frames = pixel_values.shape[:2]
        if frames > self.config.max_frame_pos:
            raise ValueError(f"{frames} frames, but the frame position table has {self.config.max_frame_pos} rows")
        size = self.config.vision_config.image_size
        if tuple(pixel_values.shape[2:]) != (3, size, size):
            raise ValueError(f"frames must be 3 x {size} x {size}, got {tuple(pixel_values.shape[2:])}")
        flat = pixel_values.reshape((batch * frames,) + tuple(pixel_values.shape[2:]))
        if not self.use_jit:
            queries = self.frame_encoder(flat)
            return self.video_encoder(queries.reshape((batch, frames) + tuple(queries.shape[1:])))
        if self._frame_jit is None:
            self._frame_jit = ms.jit(self.frame_encoder.construct)
            self._video_jit = ms.jit(self.video_encoder.construct)
        queries = self._chunked_frames(flat)
        return self._video_jit(queries.reshape((batch, frames) + tuple(queries.shape[1:])))

    def _chunked_frames(self, frames: Tensor) -> Tensor:
        """Frame queries of (N, 3, H, W) frames, ``frame_chunk`` per compiled call (the last one zero-padded)."""
        n, chunk = frames.shape[0], self.frame_chunk
        pad = (-n) % chunk
        if pad:
            frames = ops.concat((frames, ops.zeros((pad,) + tuple(frames.shape[1:]), frames.dtype)), axis=0)
        return ops.concat([self._frame_jit(frames[i:i + chunk]) for i in range(0, n + pad, chunk)], axis=0)[:n]

    def _embed_prompt(self, video_embeds: Tensor, input_ids: np.ndarray) -> Tensor:
        """Prompt embeddings with the ``VIDEO_TOKEN_INDEX`` slots of each row filled by its video, in order."""
        batch, num_video = video_embeds.shape[:2]
        if input_ids.shape[0] != batch:
            raise ValueError(f"{input_ids.shape[0]} prompts for {batch} videos")
        slots = input_ids == VIDEO_TOKEN_INDEX
        counts = slots.sum(axis=1)
        if (counts != num_video).any():
            raise ValueError(f"each prompt needs {num_video} video slots ({VIDEO_TOKEN_INDEX}), "
                             f"got {counts.tolist()}: build it with build_prompt_ids")
        embeds = self.get_input_embeddings()(Tensor(np.where(slots, 0, input_ids).astype(np.int32)))
        index = np.cumsum(slots, axis=1) - 1 + np.arange(batch)[:, None] * num_video
        index = np.where(slots, index, 0).reshape(-1).astype(np.int32)
        flat = video_embeds.astype(embeds.dtype).reshape(batch * num_video, -1)
        placed = ops.gather(flat, Tensor(index), 0).reshape(embeds.shape)
        return ops.where(Tensor(slots)[..., None], placed, embeds)

    get_image_features = get_video_features

    def _merge(self, video_embeds: Tensor, input_ids: np.ndarray, attention_mask: Optional[np.ndarray]):
        """LM input embeddings and mask of prompts holding video slots (BLIP-2's ``_merge`` interface)."""
        mask = np.ones(input_ids.shape, np.int64) if attention_mask is None else attention_mask
        return self._embed_prompt(video_embeds, input_ids.astype(np.int64)), mask

    def construct(self, pixel_values, input_ids, attention_mask=None, labels=None) -> VideoLlamaOutput:
        """Logits (B, L, V) of the prompt with the video in its slots; numpy or Tensor inputs.

        ``labels`` (B, L) aligned with ``input_ids`` (-100 on the prompt and the video slots): the
        mean cross-entropy of predicting token t+1 from t, as transformers' causal LMs compute it.
        """
        input_ids = to_numpy(input_ids).astype(np.int64)
        embeds = self._embed_prompt(self.get_video_features(pixel_values), input_ids)
        mask = np.ones(input_ids.shape, np.int32) if attention_mask is None else to_numpy(attention_mask, np.int32)
        logits = self.language_model(inputs_embeds=embeds, attention_mask=Tensor(mask)).logits
        loss = None if labels is None else causal_lm_loss(logits, to_tensor(labels, ms.int32), shift=True)
        return VideoLlamaOutput(logits=logits, loss=loss)

    def generate(self, pixel_values, input_ids, attention_mask=None, return_dict_in_generate: bool = False,
                 **generate_kwargs):
        """New token ids (N, S) after each prompt, as Video-LLaMA's chat generates from embeddings.

        ``input_ids`` (left-padded, with ``attention_mask``) come from :func:`build_prompt_ids`;
        ``generate_kwargs`` go to :func:`models.generation.generate` (``max_new_tokens``,
        ``num_beams``, ``eos_token_id``, ...).
        """
        input_ids = to_numpy(input_ids).astype(np.int64)
        embeds = self._embed_prompt(self.get_video_features(pixel_values), input_ids)
        out: GenerateOutput = generate(self.language_model, inputs_embeds=embeds, attention_mask=attention_mask,
                                       **generate_kwargs)
        return out if return_dict_in_generate else out.sequences

