"""Schema-constrained decoding (models.constrained, models.generation's grammar): every row a random model
writes is JSON that the schema accepts, in greedy, beam and sampling, on the device's selection path and the
host's; without the mask it is not JSON; bad schemas and tokenizers are refused in one line."""
from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import transformers

from models.constrained import GrammarError, JsonGrammar, compile_schema, engine_tokenizer, is_complete
from models.generation import generate, left_pad
from models.layers import init_weights
from models.llama import LlamaForCausalLM
from tests.structured_fixtures import TEST_SCHEMA, byte_level_tokenizer
from tests.tiny_models import save_word_tokenizer

SPECIALS = ["<pad>", "<|endoftext|>"]
PAD, EOS = 0, 1
NEW_TOKENS = 96


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer(SPECIALS, eos="<|endoftext|>", pad="<pad>")


@pytest.fixture(scope="module")
def model(tokenizer):
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer) + 24, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, eos_token_id=EOS, pad_token_id=PAD)
    model = LlamaForCausalLM(cfg)
    init_weights(model, std=0.2)
    return model


@pytest.fixture(scope="module")
def grammar(tokenizer):
    return JsonGrammar(TEST_SCHEMA, tokenizer)


def run(model, tokenizer, max_new_tokens: int = NEW_TOKENS, **kw) -> list[str]:
    """Three prompts of different lengths (left-padded), their new text."""
    ids, mask = left_pad([tokenizer.encode(t) for t in ("describe the video", "a red square moves left", "a")], PAD)
    out = generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, **kw)
    new = out.sequences[:, ids.shape[1]:]
    for row in new:  # after the first end token only filling (beam search fills with eos when pad is 0)
        ends = np.flatnonzero(row == EOS)
        assert not len(ends) or set(row[ends[0] + 1:].tolist()) <= {PAD, EOS}
    return tokenizer.batch_decode(new, skip_special_tokens=True)


CASES = {
    "greedy": {},
    "greedy_host": dict(select_on_device=False),
    "greedy_rules": dict(repetition_penalty=1.3, no_repeat_ngram_size=3),
    "beam": dict(num_beams=2),
    "beam_host": dict(num_beams=2, select_on_device=False),
    "beam_penalty": dict(num_beams=2, repetition_penalty=1.2, num_return_sequences=2),
    "sample": dict(do_sample=True, seed=0, temperature=1.5),
    "sample_top": dict(do_sample=True, seed=1, top_k=20, top_p=0.9),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_row_is_json_the_schema_accepts(model, tokenizer, grammar, case):
    texts = run(model, tokenizer, grammar=grammar, **CASES[case])
    assert len(texts) == 3 * CASES[case].get("num_return_sequences", 1)
    for text in texts:
        jsonschema.validate(json.loads(text), TEST_SCHEMA)


def test_without_the_mask_the_model_writes_no_json(model, tokenizer):
    for text in run(model, tokenizer, max_new_tokens=40):
        with pytest.raises(ValueError):
            json.loads(text)


def test_device_and_host_selection_agree(model, tokenizer, grammar):
    assert run(model, tokenizer, grammar=grammar) == run(model, tokenizer, grammar=grammar, select_on_device=False)
    assert run(model, tokenizer, grammar=grammar, num_beams=2) == \
        run(model, tokenizer, grammar=grammar, num_beams=2, select_on_device=False)


def test_a_row_cut_by_the_budget_is_incomplete_and_min_length_yields_to_the_grammar(model, tokenizer, grammar):
    for text in run(model, tokenizer, max_new_tokens=6, grammar=grammar):
        assert text.startswith("{") and not is_complete(text, TEST_SCHEMA)
    closed = {"type": "object", "properties": {}, "additionalProperties": False}  # only "{}" is valid
    texts = run(model, tokenizer, grammar=JsonGrammar(closed, tokenizer), min_new_tokens=20)
    assert texts == ["{}"] * 3


def test_beams_keep_their_own_matchers(tokenizer, grammar):
    """Row 1 (a filler) becomes a copy of row 0; then the two rows write different values."""
    token = tokenizer.convert_tokens_to_ids
    vocab = len(tokenizer) + 24
    rows = grammar.matchers(np.array([True, False, True]), [EOS])
    assert rows.allowed(vocab)[1].all()  # a filler row is not constrained
    rows.reorder(np.array([0, 0, 2]))
    for step in tokenizer.encode('{"short": "'):
        rows.advance(np.array([step, step, 0]), np.array([True, True, False]))
    rows.advance(np.array([token("a"), token('"'), 0]), np.array([True, True, False]))
    allowed = rows.allowed(vocab)
    assert allowed[0, token("b")] and allowed[0, token('"')]  # inside the string
    assert allowed[1, token(",")] and not allowed[1, token("b")]  # after it: the item separator
    assert allowed[2].all()  # dropped: no longer constrained
    assert not allowed[0, len(tokenizer):].any() and not allowed[0, EOS]
    with pytest.raises(RuntimeError, match="refused token"):
        rows.advance(np.array([token("b"), token("b"), 0]), np.array([True, True, False]))


@pytest.mark.parametrize("schema, message", [
    ({"type": "strin"}, "not a valid JSON Schema"),
    ({"type": "object", "properties": {"a": {"type": "string", "minLength": -1}}}, "not a valid JSON Schema"),
    ({"type": "array", "uniqueItems": True}, "cannot follow: Unimplemented keys"),
    ({"type": "string", "pattern": "(?<=a)b"}, "cannot follow"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_schemas_are_refused_in_one_line(schema, message):
    with pytest.raises(GrammarError, match=message) as info:
        compile_schema(schema)
    assert "\n" not in str(info.value)


def test_a_tokenizer_the_engine_cannot_read_is_refused_in_one_line(tmp_path):
    word_level = save_word_tokenizer(tmp_path, 64, {"<pad>": 0, "</s>": 1, "<unk>": 2})
    with pytest.raises(GrammarError, match="cannot read this tokenizer") as info:
        engine_tokenizer(word_level)
    assert "\n" not in str(info.value)
