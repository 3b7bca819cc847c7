"""Qwen2-VL, Qwen2.5-VL and LLaVA families for ``benchmarks.bench_captioning``
(``--models qwen2-vl,qwen2.5-vl,llava``).

Each family saves a mid-size random transformers checkpoint (``save_pretrained``) with a word
tokenizer built by the test fixtures' helpers, loads OUR captioner from it (generation under
``ms.jit``, the default) and a torch reference captioner with the same interface: the same frame
spec and the same ``prepare`` (ours, checked equal to the transformers processors by
tests/test_qwen2vl.py and tests/test_llava.py), and transformers' ``generate`` on the same
prepared inputs and prompt ids. So only the model differs.

Choices (not the captioners' defaults, which are sized for real checkpoints on accelerators):

* Greedy decoding, ``max_new_tokens`` 32. The mindone scripts' default of 200 new tokens would make
  a 16-video run (torch + ours, batch 1 and 8) take far too long on 2 CPU cores; the random models
  rarely emit EOS, so nearly every caption runs to the limit.
* Qwen2-VL: 8 frames sampled uniformly (``num_frames=8``) resized to 224x224 via its frame spec,
  not fps sampling: 8 frames -> grid (4, 16, 16) -> 256 video tokens per video.
  Config: vision depth 8 x 384 (embed_dim, 6 heads, patch 14, merge 2), LM 6 x 512, 8 heads,
  2 KV heads, vocab 2000, M-RoPE sections [8, 12, 12] (head dim 64).
* Qwen2.5-VL: the same frames, LM and vision width; its vision tower has 112 px windows (the
  8 x 8 merged grid is four windows), full attention in blocks 3 and 7 (as the published towers
  use one block in eight), gated MLP 384 -> 1024, and 2 tokens per second. With ``num_frames``
  sampling the frame rate is unknown, so second_per_grid_ts is 1 (2 fps) on both sides.
* LLaVA-1.5: 1 middle frame (the captioner's default) at 336 px, patch 14 -> 576 image tokens;
  CLIP vision 12 x 384 (6 heads), Llama-3-style LM 6 x 512, 8 heads, 4 KV heads, vocab 2000.

Weights are spread like the tests' (``tests.tiny_models._randomize``) so captions depend on the
video; the table counts captions equal to torch's (greedy on fp32: near-ties are rare).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import transformers
from transformers import AutoTokenizer

from pipeline.captioning.caption_llava import LlavaCaptioner
from pipeline.captioning.budget import PreparedVideo
from pipeline.captioning.caption_qwen2vl import Qwen2VLCaptioner, model_inputs
from tests.llava_fixtures import CLIP, IMAGE_TOKEN, LLAMA3, SPECIALS as LLAVA_SPECIALS
from tests.test_qwen2vl import (CHAT_TEMPLATE, ENDOFTEXT, IM_END, IMAGE_PAD, SPECIALS as QWEN_SPECIALS,
                                VIDEO_PAD, VISION_END, VISION_START)
from tests.tiny_models import _randomize, save_word_tokenizer

MAX_NEW_TOKENS = 32
VOCAB = 2000
FORWARD_BATCH = 8  # videos in the forward row

QWEN_TEXT = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=2048,
                 rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
                 tie_word_embeddings=False, bos_token_id=ENDOFTEXT, eos_token_id=IM_END, pad_token_id=ENDOFTEXT)
QWEN_VISION = dict(depth=8, embed_dim=384, hidden_size=512, num_heads=6, mlp_ratio=4, in_channels=3, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2)
QWEN_FRAMES = dict(num_frames=8, height=224, width=224)
QWEN25_VISION = dict(depth=8, hidden_size=384, intermediate_size=1024, out_hidden_size=512, num_heads=6,
                     in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                     fullatt_block_indexes=[3, 7], tokens_per_second=2, hidden_act="silu")

LLAVA_VISION = dict(CLIP, hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                    image_size=336, patch_size=14)
LLAVA_TEXT = dict(LLAMA3, vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)


# ----------------------------------------------------------------------------- Qwen2-VL


QWEN_CLASSES = {"qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration, QWEN_VISION),
                "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration,
                               QWEN25_VISION)}


def save_qwen2vl(folder: Path, seed: int = 0, model_type: str = "qwen2_vl") -> Path:
    torch.manual_seed(seed)
    config_class, model_class, vision = QWEN_CLASSES[model_type]
    config = config_class(text_config=QWEN_TEXT, vision_config=vision, image_token_id=IMAGE_PAD,
                          video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
                          vision_end_token_id=VISION_END, tie_word_embeddings=False,
                          eos_token_id=IM_END, pad_token_id=ENDOFTEXT, bos_token_id=ENDOFTEXT)
    model = model_class(config).eval()
    _randomize(model, seed)
    model.save_pretrained(folder)
    # The tests' tokenizer (specials, chat template) at the benchmark's vocabulary size.
    tokenizer = save_word_tokenizer(folder, VOCAB, {tok: i for i, tok in enumerate(QWEN_SPECIALS)})
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, unk_token="<unk>",
                                                     pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                                     additional_special_tokens=QWEN_SPECIALS[:7])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    side = QWEN_FRAMES["height"] * QWEN_FRAMES["width"]
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 28 * 28, "max_pixels": side, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
         "image_processor_type": "Qwen2VLImageProcessor"}))
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [IM_END, ENDOFTEXT], "pad_token_id": ENDOFTEXT, "bos_token_id": ENDOFTEXT}))
    return folder


class TorchQwen2VL:
    """transformers' Qwen2-VL / Qwen2.5-VL generate behind our captioner's interface."""

    def __init__(self, ours: Qwen2VLCaptioner, folder: Path):
        model_class = QWEN_CLASSES[ours.model.config.model_type][1]
        self.model = model_class.from_pretrained(folder).eval()
        self.ours = ours
        self.frame_spec = ours.frame_spec
        self.prepare = ours.prepare
        self.tokenizer = ours.tokenizer

    def generate(self, batch: Sequence) -> list[str]:
        """Captions of prepared videos (as the runner passes them) or of their ``inputs``."""
        inputs = [b.inputs if isinstance(b, PreparedVideo) else b for b in batch]
        args = {k: torch.from_numpy(v) for k, v in model_inputs(inputs, self.ours.pad_id).items()}
        # transformers 5 finds the videos by the processor's mm_token_type_ids: 2 on video placeholders
        args["mm_token_type_ids"] = (args["input_ids"] == self.model.config.video_token_id).long() * 2
        kw = self.ours.generate_kwargs
        with torch.no_grad():
            out = self.model.generate(**args, do_sample=False, num_beams=1, max_new_tokens=kw["max_new_tokens"],
                                      eos_token_id=kw["eos_token_id"], pad_token_id=kw["pad_token_id"])
        texts = self.tokenizer.batch_decode(out[:, args["input_ids"].shape[1]:], skip_special_tokens=True)
        return [t.strip() for t in texts]


def qwen2vl(folder: Path, model_type: str = "qwen2_vl") -> tuple:
    save_qwen2vl(folder, model_type=model_type)
    ours = Qwen2VLCaptioner(str(folder), max_new_tokens=MAX_NEW_TOKENS, **QWEN_FRAMES)
    ref = TorchQwen2VL(ours, folder)
    spec = ours.frame_spec
    frames = np.random.default_rng(0).integers(0, 256, (FORWARD_BATCH, spec.num_frames, spec.height, spec.width, 3),
                                               dtype=np.uint8)
    inputs = model_inputs([ours.prepare(f).inputs for f in frames], ours.pad_id)

    def torch_forward():
        ref.model(**{k: torch.from_numpy(v) for k, v in inputs.items()})

    def ours_forward(use_jit: bool):
        ours.model.visual.use_jit = use_jit
        return lambda: ours.model(**inputs).logits.asnumpy()

    return ours, ref, f"forward {FORWARD_BATCH} videos", torch_forward, ours_forward


# ----------------------------------------------------------------------------- LLaVA


def save_llava(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = transformers.LlavaConfig(vision_config=LLAVA_VISION, text_config=LLAVA_TEXT,
                                      image_token_index=IMAGE_TOKEN)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    _randomize(model, seed)
    model.save_pretrained(folder)
    size = LLAVA_VISION["image_size"]
    transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}) \
        .save_pretrained(folder)
    # tests.llava_fixtures.save_tokenizer at the benchmark's vocabulary size: <image> a special token.
    save_word_tokenizer(folder, VOCAB, LLAVA_SPECIALS)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    tokenizer.save_pretrained(folder)
    return folder


class TorchLlava:
    """transformers' LlavaForConditionalGeneration.generate behind our captioner's interface."""

    def __init__(self, ours: LlavaCaptioner, folder: Path):
        self.model = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
        self.ours = ours
        self.frame_spec = ours.frame_spec
        self.prepare = ours.prepare
        self.tokenizer = ours.tokenizer

    def generate(self, batch: Sequence) -> list[str]:
        ids, mask, pixels = llava_inputs(self.ours, batch)
        with torch.no_grad():
            out = self.model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                      pixel_values=torch.from_numpy(pixels), do_sample=False, num_beams=1,
                                      max_new_tokens=MAX_NEW_TOKENS, pad_token_id=self.ours.pad_id,
                                      **{k: v for k, v in self.ours.generate_kwargs.items() if k == "eos_token_id"})
        texts = self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        return [t.strip() for t in texts]


def llava_inputs(ours: LlavaCaptioner, batch: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded prompt ids, mask and (B*T, 3, H, W) pixels, as our captioner builds them."""
    prompts, pixels = ours.model_inputs(batch)
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), ours.pad_id, np.int64)
    mask = np.zeros((len(prompts), length), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = 1
    pixels = pixels["pixel_values"]
    return ids, mask, pixels.reshape((-1,) + pixels.shape[-3:]).astype(np.float32)


def llava(folder: Path) -> tuple:
    save_llava(folder)
    ours = LlavaCaptioner(str(folder), max_new_tokens=MAX_NEW_TOKENS, num_beams=1)
    ref = TorchLlava(ours, folder)
    frames = np.random.default_rng(0).integers(0, 256, (FORWARD_BATCH, 1, 240, 320, 3), dtype=np.uint8)
    ids, mask, pixels = llava_inputs(ours, [ours.prepare(f) for f in frames])

    def torch_forward():
        ref.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  pixel_values=torch.from_numpy(pixels))

    def ours_forward(use_jit: bool):
        ours.model.use_jit = use_jit
        return lambda: ours.model(pixels, ids, attention_mask=mask).logits.asnumpy()

    return ours, ref, f"forward {FORWARD_BATCH} images", torch_forward, ours_forward


# name -> builder(folder) -> (ours, torch reference, forward case name, torch forward, ours forward(use_jit))
FAMILIES: dict[str, Callable[[Path], tuple]] = {"qwen2-vl": qwen2vl,
                                                 "qwen2.5-vl": lambda folder: qwen2vl(folder, "qwen2_5_vl"),
                                                 "llava": llava}
