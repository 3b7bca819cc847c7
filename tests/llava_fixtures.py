"""Tiny random LLaVA-1.5 / LLaVA-NeXT / PLLaVA checkpoints, tokenizers and test videos (no hub, no downloads)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file, save_file
from transformers import AutoTokenizer

from tests.tiny_models import _randomize, save_word_tokenizer
from tests.video_factory import write_caption_clips

IMAGE_TOKEN = 4
VOCAB = 96
SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": IMAGE_TOKEN}
PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84]]

CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, image_size=56, patch_size=14, hidden_act="quick_gelu")
LLAMA3 = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0,
              rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=64),
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
MISTRAL = dict(model_type="mistral", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512, sliding_window=4096,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
POOLING = dict(pooling_method="avg", pooling_shape=[2, 3, 3], frame_shape=[4, 4], num_frames=3, use_pooling=True)

# -> the published llava-hf layout (language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*,
# multi_modal_projector.*, image_newline), from what transformers 5.25's save_pretrained writes (the published names,
# but a CLIP tower without its vision_model. level) and from its parameter names (model.language_model.*,
# model.vision_tower.* without vision_model., model.multi_modal_projector.*, model.image_newline, lm_head.*)
PUBLISHED = ((r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
             (r"^model\.", ""), (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."))
# the published layout -> the one transformers 4's save_pretrained wrote
TRANSFORMERS4 = ((r"^language_model\.model\.", "model.language_model."), (r"^language_model\.lm_head\.", "lm_head."),
                 (r"^(vision_tower|multi_modal_projector|image_newline)", r"model.\1"))


def renamed(name: str, rules) -> str:
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def rename_keys(folder: Path, rules) -> None:
    """Rewrite the folder's model.safetensors with every key renamed by ``rules``."""
    path = folder / "model.safetensors"
    save_file({renamed(k, rules): v for k, v in load_file(str(path)).items()}, str(path), metadata={"format": "pt"})


def hf_model(kind: str, seed: int = 0):
    """A tiny random transformers model: "llava" (Llama-3 decoder), "next" (Mistral decoder), "pllava"."""
    torch.manual_seed(seed)
    if kind == "next":
        config = transformers.LlavaNextConfig(vision_config=dict(CLIP, image_size=28), text_config=dict(MISTRAL),
                                              image_token_index=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS)
        model = transformers.LlavaNextForConditionalGeneration(config)
    else:
        config = transformers.LlavaConfig(vision_config=dict(CLIP), text_config=dict(LLAMA3),
                                          image_token_index=IMAGE_TOKEN)
        model = transformers.LlavaForConditionalGeneration(config)
    model.eval()
    _randomize(model, seed)
    return model


def save_tokenizer(folder: Path) -> None:
    """Word tokenizer whose ``<image>`` (id 4) and ``</s>`` are special tokens, as in llava-hf tokenizers."""
    save_word_tokenizer(folder, VOCAB, SPECIALS)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    tokenizer.save_pretrained(folder)


def save_checkpoint(folder: Path, kind: str, seed: int = 0, published: bool = False, lora: bool = False):
    """Save a tiny model + tokenizer + image processor config; returns the transformers model.

    ``published``: rename keys to the llava-hf hub layout and write the text config's RoPE settings as published
    config.json files have them; ``lora`` (PLLaVA): that, and also wrap the decoder's q/v projections as PEFT
    LoRA (base_layer + lora_A/B, r 2), the model's weights being their merge.
    """
    folder.mkdir(parents=True, exist_ok=True)
    model = hf_model(kind, seed)
    model.save_pretrained(folder)
    size = 28 if kind == "next" else 56
    if kind == "next":
        processor = transformers.LlavaNextImageProcessor(size={"shortest_edge": size},
                                                         crop_size={"height": size, "width": size},
                                                         image_grid_pinpoints=PINPOINTS)
    else:
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                                    crop_size={"height": size, "width": size})
    processor.save_pretrained(folder)
    save_tokenizer(folder)
    config = json.loads((folder / "config.json").read_text())
    if kind == "pllava":
        config.update(POOLING)
    if published or lora:
        config["text_config"] = published_rope(config["text_config"])
        path = folder / "model.safetensors"
        state = {renamed(k, PUBLISHED): v for k, v in load_file(str(path)).items()}
        if lora:
            state = lora_wrap(state, seed)
            with torch.no_grad():  # the reference model gets the merged weights
                merged = {k: torch.from_numpy(v) for k, v in merge_lora(state).items()}
                for name, param in model.named_parameters():
                    param.copy_(merged[renamed(name, PUBLISHED)])
        save_file(state, str(path), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return model


def published_rope(text_config: dict) -> dict:
    """A text config as published config.json files have it: transformers 5's ``rope_parameters`` written as
    transformers 4's top-level ``rope_theta`` and ``rope_scaling`` (null without scaling)."""
    text_config = dict(text_config)
    rope = dict(text_config.pop("rope_parameters"))
    text_config["rope_theta"] = rope.pop("rope_theta")
    text_config["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    return text_config


LORA_ALPHA = 4.0


def lora_wrap(state: dict, seed: int, rank: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in state.items():
        name = name.replace("language_model.", "language_model.base_model.model.", 1) \
            if name.startswith("language_model.") else name
        match = re.match(r"^(.*self_attn\.[qv]_proj)\.weight$", name)
        if match:
            prefix = match.group(1)
            out[f"{prefix}.base_layer.weight"] = value
            out[f"{prefix}.lora_A.default.weight"] = rng.normal(0, 0.5, (rank, value.shape[1])).astype(np.float32)
            out[f"{prefix}.lora_B.default.weight"] = rng.normal(0, 0.5, (value.shape[0], rank)).astype(np.float32)
        else:
            out[name] = value
    return out


def merge_lora(state: dict) -> dict:
    """PEFT's merge (W + alpha/r B A) with the published-layout names."""
    out = {}
    for name, value in state.items():
        if ".lora_" in name:
            continue
        name = name.replace("language_model.base_model.model.", "language_model.")
        if name.endswith(".base_layer.weight"):
            prefix = name[: -len(".base_layer.weight")]
            wrapped = prefix.replace("language_model.", "language_model.base_model.model.", 1)
            lora_a, lora_b = state[f"{wrapped}.lora_A.default.weight"], state[f"{wrapped}.lora_B.default.weight"]
            value = value + (LORA_ALPHA / lora_a.shape[0]) * (lora_b @ lora_a)
            name = f"{prefix}.weight"
        out[name] = value
    return out


def make_videos(folder: Path) -> Path:
    """Four visibly different 64x48 clips and a broken one, listed in meta.csv."""
    return write_caption_clips(folder)


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad, np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = 1
    return ids, mask
