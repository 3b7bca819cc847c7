"""Tiny random transformers models and tokenizers for tests and benchmarks (no hub, no downloads)."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Blip2Config, Blip2ForConditionalGeneration as HFBlip2, PreTrainedTokenizerFast

NUM_QUERY = 4
IMAGE_TOKEN = 60

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=28, patch_size=14, qkv_bias=True)
QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               cross_attention_frequency=2)
OPT = dict(model_type="opt", vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
           num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
           pad_token_id=1, bos_token_id=2, eos_token_id=2)
T5 = dict(model_type="t5", vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
          feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
          decoder_start_token_id=0)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Spread every weight (query tokens and biases start at zero) so outputs are far from trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "qkv.bias" in name:
                third = p.shape[0] // 3
                noise[third:2 * third] = 0.0  # the key bias is fixed at zero in BLIP-2
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise if p.dim() > 1 else 0.1 * noise)


def untie_t5_head(model) -> None:
    """Give a transformers T5 built from a T5 v1.1 / Flan-T5 config (``tie_word_embeddings=False``) its own
    ``lm_head``, as the published Flan-T5 weights have. transformers 5 ties every new T5's head to ``shared``
    and unties it only on loading a checkpoint whose ``lm_head`` differs; the flag itself only turns off the
    output scaling (``config.scale_decoder_outputs``)."""
    if not model.config.scale_decoder_outputs:
        model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape))


def hf_blip2(text: dict, image_token: bool = True, seed: int = 0, vision: dict | None = None,
             qformer: dict | None = None, num_query_tokens: int = NUM_QUERY) -> HFBlip2:
    torch.manual_seed(seed)
    config = Blip2Config(vision_config=vision or VISION, qformer_config=qformer or QFORMER, text_config=text,
                         num_query_tokens=num_query_tokens,
                         image_token_index=IMAGE_TOKEN if image_token else None)
    model = HFBlip2(config).eval()
    if text["model_type"] == "t5":
        untie_t5_head(model.language_model)
    _randomize(model, seed)
    return model


WORDS = ("a video of red green blue yellow square circle triangle moves left right up down grows "
         "shrinks bounces appears the and is on in small big").split()


def save_word_tokenizer(folder: str | Path, vocab_size: int, specials: dict[str, int]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer filling ``vocab_size`` ids, saved the way transformers loads it."""
    vocab = dict(specials)
    for word in WORDS + [f"w{i}" for i in range(vocab_size)]:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    unk = next(t for t in specials if "unk" in t)
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    by_id = {i: t for t, i in specials.items()}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=unk,
                                        pad_token=next(t for t in specials if "pad" in t),
                                        eos_token=by_id.get(specials.get("</s>", -1)))
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_tiny_blip2(folder: str | Path, text: dict, seed: int = 0, image_token: bool = True,
                    **blip2_kwargs) -> Path:
    """A tiny random BLIP-2 with a word tokenizer, in ``folder``.

    ``image_token``: the config has ``image_token_index`` as the updated published checkpoints
    do (transformers 4.56 generates only that way); without it, the older prepend layout.
    """
    folder = Path(folder)
    hf_blip2(text, image_token=image_token, seed=seed, **blip2_kwargs).save_pretrained(folder)
    if text["model_type"] == "opt":
        specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    else:
        specials = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    save_word_tokenizer(folder, text["vocab_size"], specials)
    return folder
