"""Fixtures of the structured-caption tests: a byte-level BPE tokenizer as Qwen's (every byte a token, so a
random model can write any text), a small schema a random model completes within a few dozen tokens, and a
tiny Qwen2-VL checkpoint that uses that tokenizer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import transformers

TEST_SCHEMA = {
    "type": "object",
    "properties": {
        "short": {"type": "string", "maxLength": 12, "description": "the main content"},
        "shot_type": {"enum": ["close-up", "wide shot", "aerial"]},
        "objects": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
        "moving": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["short", "shot_type", "objects", "moving", "count"],
    "additionalProperties": False,
}
TEXTS = [json.dumps({"short": "a red square", "shot_type": "wide shot", "objects": ["square", "circle"],
                     "moving": True, "count": 2}),
         "describe the video in detail. a blue circle moves left over a green field under a grey sky",
         "Answer with one JSON object with these keys: short, dense, background, style, shot_type, lighting"]


def byte_level_tokenizer(specials: Sequence[str], eos: str, pad: str, vocab_size: int = 400
                         ) -> transformers.PreTrainedTokenizerFast:
    """Qwen2's pre-tokenizer split, NFC and byte-level BPE over all 256 bytes, learnt from ``TEXTS``;
    ``specials`` take the first ids, in order."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=pad,
                                                additional_special_tokens=[s for s in specials if s not in (eos, pad)])


def save_qwen2vl_bpe(folder: Path, seed: int = 0) -> Path:
    """The tiny Qwen2-VL of tests/test_qwen2vl.py with a byte-level BPE tokenizer; its LM head is 16 columns
    wider than the tokenizer, as Qwen's published heads are."""
    from tests import test_qwen2vl as tiny

    tokenizer = byte_level_tokenizer(tiny.SPECIALS[:7], eos="<|im_end|>", pad="<|endoftext|>")
    tokenizer.chat_template = tiny.CHAT_TEMPLATE
    config = tiny.tiny_config()
    config.text_config.vocab_size = len(tokenizer) + 16
    tiny.torch.manual_seed(seed)
    model = tiny.spread_weights(transformers.Qwen2VLForConditionalGeneration(config).eval(), seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {**tiny.PIXELS, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
         "image_processor_type": "Qwen2VLImageProcessor"}))
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [tiny.IM_END, tiny.ENDOFTEXT], "pad_token_id": tiny.ENDOFTEXT,
         "bos_token_id": tiny.ENDOFTEXT}))
    return folder
