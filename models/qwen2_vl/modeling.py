"""Qwen2-VL (``Qwen/Qwen2-VL-*-Instruct``): vision tower + Qwen2 decoder with multimodal rotary (M-RoPE).

Images and videos become vision tokens (``models.qwen2_vl.vision``) that replace the prompt's
``<|image_pad|>`` / ``<|video_pad|>`` placeholders in order. Every token gets a 3-D position
(temporal, height, width): text advances all three together, vision tokens take their grid
coordinates (``get_rope_index``, as transformers computes it, left padding included). The rotary
channels are split by ``mrope_section`` between the three axes.

Qwen2.5-VL (``models.qwen2_5_vl``) is this model with another vision tower (``vision_class``) and
time-based temporal positions (``tokens_per_second`` in its vision config, see ``get_rope_index``).

Generation uses ``models.generation``. The cache's first tensor is a per-row position table
(B, 3, max_length): the prompt's 3-D positions, then ``slot + rope_delta`` for generated tokens,
where ``rope_delta = max prompt position + 1 - prompt length`` continues each row's positions
from its own last one (so a left-padded row decodes exactly like the same prompt alone).
``generate`` hands the prompt positions to ``init_cache`` through ``_prompt_positions``, and the
prompt's DeepStack features (Qwen3-VL) to the prompt's step alone (``models.generation``'s
``prompt_inputs``): they are added there and never enter the cache.

Parameter names are the published checkpoints' (``visual.*``, ``model.*``, ``lm_head.*``), which
transformers' ``save_pretrained`` (4.56 and 5.25) also writes; its in-memory layout (``model.visual.*``,
``model.language_model.*``), which other writers save, is renamed on load.
Attention and MLP keep separate q/k/v/o and gate/up/down projections so heads and the MLP can
later be split for tensor parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from models.generation import GenerateOutput, causal_lm_loss, generate, pad_to_buckets, slot_ids
from models.layers import RMSNorm
from models.llama import LlamaDecoderLayer
from models.parallel import VocabParallelEmbedding, tied_logits, vocab_head
from models.qwen2_vl.vision import Qwen2VisionTransformer

if TYPE_CHECKING:
    from transformers import Qwen2VLConfig


@dataclass
class Qwen2VLOutput:
    """``logits`` (B, L, V); ``loss`` when labels are given; ``rope_deltas`` (B, 1): max prompt position + 1 -
    padded prompt length (transformers 5 subtracts each row's unpadded length instead)."""

    logits: Tensor
    loss: Optional[Tensor] = None
    rope_deltas: Optional[np.ndarray] = None


def _numpy(x) -> Optional[np.ndarray]:
    if x is None or isinstance(x, np.ndarray):
        return x
    return x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)


def _video_seconds(config, videos: int, second_per_grid_ts) -> Optional[np.ndarray]:
    """Seconds per temporal patch of each video (float32; 1 when not given, as transformers), or None
    for Qwen2-VL, whose temporal positions are patch indices (no ``tokens_per_second``)."""
    if getattr(config.vision_config, "tokens_per_second", None) is None:
        if second_per_grid_ts is not None:
            raise ValueError(f"{config.model_type} has no time-based positions (second_per_grid_ts is Qwen2.5-VL's)")
        return None
    if second_per_grid_ts is None:
        return np.ones(videos, np.float32)
    seconds = np.asarray(second_per_grid_ts, np.float32).reshape(-1)
    if len(seconds) != videos:
        raise ValueError(f"second_per_grid_ts has {len(seconds)} entries for {videos} videos")
    return seconds


def get_rope_index(config: "Qwen2VLConfig", input_ids: np.ndarray, attention_mask: Optional[np.ndarray] = None,
                   image_grid_thw: Optional[np.ndarray] = None, video_grid_thw: Optional[np.ndarray] = None,
                   second_per_grid_ts: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """3-D positions (3, B, L) and ``rope_deltas`` (B, 1, see :class:`Qwen2VLOutput`), as Qwen's reference code.

    Padding slots get position 1 (they are masked anyway). Grids are consumed in prompt order
    across the batch; a vision item is a ``<|vision_start|>`` followed by its pad token. A video's
    temporal patch t sits at temporal position t (Qwen2-VL) or, for Qwen2.5-VL, at its time
    ``floor(t * second_per_grid_ts * tokens_per_second)`` (float32, as Qwen's reference code; an
    image's temporal position stays 0). Text continues from the largest position so far + 1.

    transformers 5.25 agrees (it no longer casts ``second_per_grid_ts`` to an integer first, as 4.56
    did) except for text after a video whose temporal positions reach past its longer merged side:
    it continues that text at the video's first position + the longer merged side, inside the range
    the video's later frames use. Qwen's reference (transformers 4, vLLM) does as we do.
    """
    merge = config.vision_config.spatial_merge_size
    image_token, video_token = config.image_token_id, config.video_token_id
    start_token = config.vision_start_token_id
    batch, length = input_ids.shape
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    positions = np.ones((3, batch, length), np.int64)
    deltas = np.zeros((batch, 1), np.int64)
    videos = np.zeros((0, 3)) if video_grid_thw is None else np.asarray(video_grid_thw).reshape(-1, 3)
    seconds = _video_seconds(config, len(videos), second_per_grid_ts)
    images = np.zeros((0, 3)) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    image_items = ((grid, None if seconds is None else np.float32(0)) for grid in images)
    video_items = ((grid, None if seconds is None else seconds[i]) for i, grid in enumerate(videos))
    items = {image_token: image_items, video_token: video_items}
    for row in range(batch):
        keep = attention_mask[row] == 1
        tokens = input_ids[row][keep].tolist()
        starts = [i for i, tok in enumerate(tokens[:-1]) if tok == start_token]
        remaining = {kind: sum(tokens[i + 1] == kind for i in starts) for kind in (image_token, video_token)}
        parts: list[np.ndarray] = []
        cursor = 0
        for _ in range(sum(remaining.values())):
            ends = {kind: (tokens.index(kind, cursor) if remaining[kind] > 0 and kind in tokens[cursor:]
                           else len(tokens) + 1) for kind in (image_token, video_token)}
            kind = image_token if ends[image_token] < ends[video_token] else video_token
            remaining[kind] -= 1
            grid, second = next(items[kind])
            t, h, w = (int(v) for v in grid)
            h, w = h // merge, w // merge
            text_len = ends[kind] - cursor
            offset = parts[-1].max() + 1 if parts else 0
            parts.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + offset)
            if second is None:
                times = np.arange(t)
            else:
                tokens_per_second = np.float32(config.vision_config.tokens_per_second)
                times = (np.arange(t, dtype=np.float32) * second * tokens_per_second).astype(np.int64)
            grid = np.stack([np.repeat(times, h * w), np.tile(np.repeat(np.arange(h), w), t),
                             np.tile(np.arange(w), t * h)])
            parts.append(grid + text_len + offset)
            cursor = ends[kind] + t * h * w
        if cursor < len(tokens):
            offset = parts[-1].max() + 1 if parts else 0
            parts.append(np.broadcast_to(np.arange(len(tokens) - cursor), (3, len(tokens) - cursor)) + offset)
        row_positions = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
        positions[:, row, keep] = row_positions
        deltas[row, 0] = (row_positions.max() + 1 if row_positions.size else 0) - length
    return positions, deltas


class MultimodalRotary(nn.Cell):
    """cos/sin (B, T, head_dim) from 3-D positions: channel c rotates by the axis ``mrope_section`` gives it.

    Qwen2-VL gives each axis a block of frequencies (t, then h, then w); Qwen3-VL (``interleaved``) cycles
    t, h, w over the first 3 * section channels and gives the rest to t, so every axis gets high and low
    frequencies.

    ``rotary_dim`` (default ``head_dim``): Qwen3.5's partial rotary, only each head's first ``rotary_dim``
    channels rotate; the frequencies are those of a ``rotary_dim``-wide head, ``mrope_section`` covers
    ``rotary_dim / 2`` and cos/sin are ``rotary_dim`` wide (``apply_rotary`` passes the other channels through).
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: list[int], interleaved: bool = False,
                 rotary_dim: Optional[int] = None):
        super().__init__()
        dim = head_dim if rotary_dim is None else rotary_dim
        if not 0 < dim <= head_dim or dim % 2:
            raise ValueError(f"rotary_dim {dim} must be even and between 1 and head_dim {head_dim}")
        if 2 * sum(mrope_section) != dim:
            what = "head_dim" if dim == head_dim else "rotary_dim (head_dim x partial_rotary_factor)"
            raise ValueError(f"mrope_section {mrope_section} must sum to {what}/2 = {dim // 2}")
        inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        inv_freq = np.concatenate([inv_freq, inv_freq]).astype(np.float32)
        if interleaved:
            channel = np.arange(dim // 2)
            half = np.zeros(dim // 2, np.int64)
            for i in (1, 2):
                half[(channel % 3 == i) & (channel < 3 * mrope_section[i])] = i
        else:
            half = np.concatenate([np.full(n, i) for i, n in enumerate(mrope_section)])
        axis = np.concatenate([half, half])
        table = np.zeros((3, dim), np.float32)
        table[axis, np.arange(dim)] = inv_freq
        self.freq_table = Tensor(table)  # (3, rotary dim): one non-zero per column, so the product is exact

    def construct(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        angles = ops.matmul(positions.astype(ms.float32).swapaxes(1, 2), self.freq_table)
        return ops.cos(angles), ops.sin(angles)


class Qwen2VLTextModel(nn.Cell):
    """The Qwen2 decoder stack (``model.*`` in the published checkpoints), or with ``qk_norm`` and
    ``interleaved`` M-RoPE Qwen3-VL's (biases None: ``config.attention_bias``).

    A subclass may build other layers (:meth:`decoder_layer`, called as ``LlamaDecoderLayer`` with two cache
    tensors each) and a final norm that scales by 1 + weight (``unit_offset_norm``): Qwen3.5's hybrid stack
    (``models.qwen3_5.vision_language``). A ``partial_rotary_factor`` in ``rope_parameters`` rotates only that
    share of each head's channels (:class:`MultimodalRotary`'s ``rotary_dim``)."""

    unit_offset_norm = False
    default_mrope_section: Optional[list[int]] = None  # when rope_parameters has none (Qwen3.5: transformers')

    def __init__(self, config, qkv_bias: bool | None = True, o_bias: bool | None = False, qk_norm: bool = False,
                 interleaved: bool = False):
        super().__init__()
        if getattr(config, "use_sliding_window", False):
            raise NotImplementedError("sliding-window attention is not supported (Qwen2-VL does not use it)")
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # Qwen2's decoder is Llama's with biased q/k/v projections (and M-RoPE, applied through cos/sin).
        self.layers = nn.CellList([self.decoder_layer(config, i, qkv_bias, o_bias, qk_norm)
                                   for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, self.unit_offset_norm)
        # transformers 5 gathers a config.json's top-level rope_theta and rope_scaling ({"type": "mrope",
        # "mrope_section": ...}) into rope_parameters, with rope_type "default" for M-RoPE.
        rope = config.rope_parameters
        if rope["rope_type"] != "default":
            raise NotImplementedError(f"rope_type {rope['rope_type']!r} is not supported")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary_dim = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
        section = rope.get("mrope_section") or self.default_mrope_section
        if section is None:
            raise ValueError("rope_parameters has no mrope_section (the M-RoPE split of the rotary channels)")
        self.rotary = MultimodalRotary(head_dim, rope["rope_theta"], section, interleaved, rotary_dim)

    def decoder_layer(self, config, index: int, qkv_bias: bool | None, o_bias: bool | None,
                      qk_norm: bool) -> nn.Cell:
        """Layer ``index`` of the stack."""
        return LlamaDecoderLayer(config, qkv_bias, o_bias, qk_norm, index)

    def construct(self, inputs_embeds, attention_mask, positions, slots, cache=None, deepstack=()):
        """T positions (3-D ``positions`` (B, 3, T)) written at ``slots``; the mask covers all key slots.
        ``deepstack[i]`` (B, T, D) is added to the output of layer i (Qwen3-VL's DeepStack)."""
        cos, sin = self.rotary(positions)
        cos, sin = cos[:, None].astype(inputs_embeds.dtype), sin[:, None].astype(inputs_embeds.dtype)
        mask = attention_mask.astype(ms.int32)
        x = inputs_embeds
        new_cache = ()
        for i, layer in enumerate(self.layers):
            if cache is None:
                x, _, _ = layer(x, cos, sin, mask, slots)
            else:
                x, key, value = layer(x, cos, sin, mask, slots, cache[2 * i], cache[2 * i + 1])
                new_cache += (key, value)
            if i < len(deepstack):
                x = x + deepstack[i].astype(x.dtype)
        return self.norm(x), new_cache


class Qwen2VLForConditionalGeneration(nn.Cell):
    """Qwen2-VL with transformers' forward/generate arguments (inference; loss for training)."""

    is_encoder_decoder = False
    vision_class: type = Qwen2VisionTransformer
    text_model_class: type = Qwen2VLTextModel  # the decoder stack (Qwen3.5: its hybrid subclass)
    decoder_options: dict = {}  # Qwen2VLTextModel's options for a family's decoder (Qwen3-VL's q/k norm ...)
    checkpoint_rename_rules = [(r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual.")]

    def __init__(self, config: "Qwen2VLConfig"):
        super().__init__()
        self.config = config
        text = config.text_config
        self.visual = self.vision_class(config.vision_config)
        self.model = self.text_model_class(text, **self.decoder_options)
        # transformers 5 keeps tie_word_embeddings on the outer config (a published flat config.json's
        # text_config has none); 5.25 forwards a nested text_config's outward, 5.2 does not.
        self.tie_word_embeddings = bool(config.tie_word_embeddings or getattr(text, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else vocab_head(text.hidden_size, text.vocab_size)
        self.tied_weights_keys = ("lm_head.weight",) if self.tie_word_embeddings else ()
        self._prompt_positions: Optional[tuple[np.ndarray, np.ndarray]] = None

    def get_input_embeddings(self) -> VocabParallelEmbedding:
        return self.model.embed_tokens

    def _logits(self, hidden: Tensor) -> Tensor:
        return tied_logits(hidden, self.model.embed_tokens) if self.lm_head is None else self.lm_head(hidden)

    def get_image_features(self, pixel_values, image_grid_thw) -> Tensor:
        """Image patch rows -> (sum of t*h*w/4, hidden) LM tokens, images in order (a vision tower with
        DeepStack returns a tuple: these tokens, then its DeepStack features of the same shape)."""
        return self.visual(pixel_values, image_grid_thw)

    def get_video_features(self, pixel_values_videos, video_grid_thw) -> Tensor:
        return self.visual(pixel_values_videos, video_grid_thw)

    def _place(self, embeds: Tensor, input_ids: np.ndarray, token: int, features: Tensor, kind: str) -> Tensor:
        """Put ``features`` rows, in order, where ``input_ids == token`` (transformers' masked_scatter)."""
        slots = input_ids == token
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(f"{kind} features and {kind} tokens do not match: tokens {int(slots.sum())}, "
                             f"features {features.shape[0]}")
        index = np.where(slots, np.cumsum(slots.reshape(-1)).reshape(slots.shape) - 1, 0).astype(np.int32)
        placed = ops.gather(features.astype(embeds.dtype), Tensor(index.reshape(-1)), 0).reshape(embeds.shape)
        return ops.where(Tensor(slots)[..., None], placed, embeds)

    def embed_inputs(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                     video_grid_thw=None) -> tuple[Tensor, tuple]:
        """Token embeddings with the image and video tokens in place of their placeholders, and the DeepStack
        features: one (B, L, D) tensor per decoder layer that receives them, zero off the vision tokens
        (none without DeepStack)."""
        ids = _numpy(input_ids).astype(np.int64)
        embeds = self.model.embed_tokens(Tensor(ids.astype(np.int32)))
        deepstack: tuple = ()
        for kind, token, features in (
                ("image", self.config.image_token_id,
                 None if pixel_values is None else self.get_image_features(pixel_values, image_grid_thw)),
                ("video", self.config.video_token_id,
                 None if pixel_values_videos is None else self.get_video_features(pixel_values_videos,
                                                                                  video_grid_thw))):
            if features is None:
                continue
            features = features if isinstance(features, tuple) else (features,)
            embeds = self._place(embeds, ids, token, features[0], kind)
            base = deepstack or tuple(ops.zeros_like(embeds) for _ in features[1:])
            deepstack = tuple(self._place(d, ids, token, f, kind) for d, f in zip(base, features[1:]))
        return embeds, deepstack

    def rope_index(self, input_ids: np.ndarray, attention_mask: np.ndarray, image_grid_thw, video_grid_thw,
                   second_per_grid_ts) -> tuple[np.ndarray, np.ndarray]:
        """The prompt's 3-D positions and rope deltas (:func:`get_rope_index`; Qwen3-VL has its own)."""
        return get_rope_index(self.config, input_ids, attention_mask, image_grid_thw, video_grid_thw,
                              second_per_grid_ts)

    def construct(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                  pixel_values=None, pixel_values_videos=None, image_grid_thw=None, video_grid_thw=None,
                  rope_deltas=None, second_per_grid_ts=None) -> Qwen2VLOutput:
        """transformers' ``forward`` (no cache); numpy or Tensor inputs; ``second_per_grid_ts`` (one per video:
        seconds per temporal patch) only for Qwen2.5-VL."""
        ids = _numpy(input_ids)
        deepstack: tuple = ()
        if inputs_embeds is None:
            inputs_embeds, deepstack = self.embed_inputs(ids, pixel_values, image_grid_thw, pixel_values_videos,
                                                         video_grid_thw)
        elif not isinstance(inputs_embeds, Tensor):
            inputs_embeds = Tensor(np.asarray(inputs_embeds))
        batch, length = inputs_embeds.shape[:2]
        mask = np.ones((batch, length), np.int64) if attention_mask is None else _numpy(attention_mask)
        if position_ids is None:
            if ids is None:
                raise ValueError("give input_ids or position_ids: 3-D positions come from the prompt's tokens")
            position_ids, rope_deltas = self.rope_index(ids, mask, _numpy(image_grid_thw), _numpy(video_grid_thw),
                                                        _numpy(second_per_grid_ts))
        positions = np.asarray(_numpy(position_ids))
        if positions.ndim == 2:
            positions = np.broadcast_to(positions[None], (3,) + positions.shape)
        hidden, _ = self.model(inputs_embeds, Tensor(mask.astype(np.int32)),
                               Tensor(positions.transpose(1, 0, 2).astype(np.int32)),
                               ops.arange(length).astype(ms.int32), deepstack=deepstack)
        logits = self._logits(hidden)
        loss = None if labels is None else causal_lm_loss(logits, Tensor(_numpy(labels).astype(np.int32)), True)
        return Qwen2VLOutput(logits=logits, loss=loss, rope_deltas=rope_deltas)

    # --- generation protocol (see models.generation)

    def init_cache(self, batch_size: int, max_length: int) -> tuple:
        """(position table (B, 3, max_length) int32, then :meth:`layer_cache`: two tensors per layer)."""
        if self._prompt_positions is None:
            raise RuntimeError("the model needs its 3-D prompt positions: generate through model.generate(...)")
        positions, deltas = self._prompt_positions
        repeat = batch_size // positions.shape[1]
        positions, deltas = np.repeat(positions, repeat, axis=1), np.repeat(deltas, repeat, axis=0)
        length = positions.shape[2]
        table = np.empty((batch_size, 3, max_length), np.int32)
        table[:, :, :length] = positions.transpose(1, 0, 2)
        table[:, :, length:] = (np.arange(length, max_length)[None, :] + deltas)[:, None, :]
        return (Tensor(table),) + self.layer_cache(batch_size, max_length)

    def layer_cache(self, batch_size: int, max_length: int) -> tuple:
        """K and V (B, kv_heads, max_length, head_dim) per layer (Qwen3.5: its hybrid layers' states)."""
        attn = self.model.layers[0].self_attn  # this rank's key/value heads
        shape = (batch_size, attn.num_kv_heads, max_length, attn.head_dim)
        dtype = self.model.embed_tokens.weight.dtype
        return tuple(ops.zeros(shape, dtype) for _ in range(2 * len(self.model.layers)))

    def decode_step(self, input_ids, inputs_embeds, attention_mask, cache_position, *cache):
        """``cache``: the table and K/V per layer, then, in the prompt's step only, its DeepStack features
        (Qwen3-VL), added to the first layers' outputs."""
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        layers = 2 * len(self.model.layers)
        table, kv, deepstack = cache[0], cache[1:1 + layers], cache[1 + layers:]
        slots = slot_ids(cache_position, inputs_embeds.shape[1])
        positions = ops.gather(table, slots, 2)
        hidden, new_cache = self.model(inputs_embeds, attention_mask, positions, slots, kv, deepstack)
        logits = self._logits(hidden[:, -1:])[:, 0].astype(ms.float32)
        return (logits, table) + new_cache

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                 return_dict_in_generate: bool = False, **generate_kwargs):
        """Prompt ids followed by new tokens (N, S) int64, as transformers' generate.

        ``input_ids`` hold the expanded placeholders (one ``<|image_pad|>``/``<|video_pad|>`` per vision
        token); batches are left-padded with ``attention_mask``; ``second_per_grid_ts`` as in
        :meth:`construct`. ``generate_kwargs`` go to :func:`models.generation.generate`
        (``max_new_tokens``, ``eos_token_id`` (int or list),
        ``pad_token_id``, ``num_beams``, ``do_sample`` ...). With ``return_dict_in_generate`` the
        :class:`GenerateOutput` is returned.

        The prompt is padded here to the generation core's length and batch buckets (before the 3-D
        positions are computed, so they match), and the padding is cut off the result.
        """
        ids = _numpy(input_ids).astype(np.int64)
        mask = np.ones_like(ids) if attention_mask is None else _numpy(attention_mask).astype(np.int64)
        rows, cols = ids.shape
        ids, mask = pad_to_buckets(ids, mask, self.config.text_config.pad_token_id or 0)
        embeds, deepstack = self.embed_inputs(ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        positions, deltas = self.rope_index(ids, mask, _numpy(image_grid_thw), _numpy(video_grid_thw),
                                            _numpy(second_per_grid_ts))
        self._prompt_positions = (positions, deltas)
        try:
            out: GenerateOutput = generate(self, input_ids=ids, inputs_embeds=embeds, attention_mask=mask,
                                           prompt_inputs=deepstack, **generate_kwargs)
        finally:
            self._prompt_positions = None
        per_row = out.sequences.shape[0] // ids.shape[0]
        out.first_rows(rows * per_row).sequences = out.sequences[:, ids.shape[1] - cols:]
        return out if return_dict_in_generate else out.sequences
