"""Parity of the MindSpore OPT / T5 ports and models.generation with transformers (PyTorch, fp32).

Tiny random HF models are saved with save_pretrained and loaded into ours from the safetensors file.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mindspore as ms  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from models.opt import OPTForCausalLM  # noqa: E402
from models.t5 import T5ForConditionalGeneration, relative_position_buckets  # noqa: E402
from tests.tiny_models import untie_t5_head  # noqa: E402

VOCAB = 99


def load_weights(model, folder) -> None:
    """Name-matched load from ``model.safetensors``; tied copies may be present, nothing else may differ."""
    state = load_file(str(folder / "model.safetensors"))
    params = dict(model.parameters_and_names())
    unexpected = set(state) - set(params) - set(model.tied_weights_keys)
    missing = set(params) - set(state)
    assert not unexpected and not missing, (sorted(unexpected), sorted(missing))
    for name, param in params.items():
        assert tuple(param.shape) == state[name].shape, name
        param.set_data(ms.Tensor(state[name]))


def build(hf_cls, ms_cls, config, folder):
    torch.manual_seed(0)
    hf = hf_cls(config).eval()
    if config.model_type == "t5":
        untie_t5_head(hf)
    hf.save_pretrained(folder)
    ours = ms_cls(config)
    load_weights(ours, folder)
    return hf, ours


def opt_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=37, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=1, bos_token_id=2,
                eos_token_id=2)
    return transformers.OPTConfig(**{**base, **kw})


def t5_config(**kw):
    base = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=20,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                pad_token_id=0, eos_token_id=1)
    return transformers.T5Config(**{**base, **kw})


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    return build(transformers.OPTForCausalLM, OPTForCausalLM, opt_config(), tmp_path_factory.mktemp("opt"))


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return build(transformers.T5ForConditionalGeneration, T5ForConditionalGeneration, t5_config(),
                 tmp_path_factory.mktemp("t5"))


def left_padded_batch():
    rs = np.random.RandomState(0)
    ids = rs.randint(3, VOCAB, (3, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    ids[mask == 0] = 1
    return ids, mask


def hf_generate(hf, **kw):
    tensors = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    with torch.no_grad():
        return hf.generate(do_sample=False, **tensors)


def frequent_token(hf, **kw) -> int:
    """A token greedy decoding produces early in row 0: used as EOS so that rows finish at different steps."""
    seq = hf_generate(hf, max_new_tokens=4, **kw)
    seq = seq.sequences if hasattr(seq, "sequences") else seq
    return int(seq[0, -2])


def assert_beams_match(hf, ours, inputs: dict, **kw) -> None:
    """All returned beams and their scores equal transformers' beam search."""
    ref = hf_generate(hf, output_scores=True, return_dict_in_generate=True, **inputs, **kw)
    got = ours.generate(use_jit=False, **inputs, **kw)
    np.testing.assert_array_equal(got.sequences, ref.sequences.numpy())
    np.testing.assert_allclose(got.sequences_scores, ref.sequences_scores.numpy(), atol=1e-4)


# ----------------------------------------------------------------------------- forward parity


@pytest.mark.parametrize("variant", [{}, {"do_layer_norm_before": False, "word_embed_proj_dim": 32}])
def test_opt_logits_and_loss(tmp_path, variant):
    hf, ours = build(transformers.OPTForCausalLM, OPTForCausalLM, opt_config(**variant), tmp_path)
    ids, mask = left_padded_batch()
    # Logits at padded positions carry no meaning (a query that sees only padding: transformers 5 gives it a
    # zero attention output, we attend uniformly), so they are not compared, and the loss counts only tokens
    # predicted from a real token (not a row's first token after its padding).
    labels = np.where(mask == 1, ids, -100)
    labels[:, 1:][mask[:, :-1] == 0] = -100
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
        embeds = hf.get_input_embeddings()(torch.tensor(ids)).numpy()
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    out_e = ours(inputs_embeds=embeds, attention_mask=ms.Tensor(mask))
    valid = mask == 1
    assert np.abs(out.logits.asnumpy() - ref.logits.numpy())[valid].max() < 1e-4
    assert np.abs(out_e.logits.asnumpy() - ref.logits.numpy())[valid].max() < 1e-4
    assert abs(float(out.loss) - float(ref.loss)) < 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_t5_logits_and_loss(tmp_path, tied):
    cfg = t5_config(tie_word_embeddings=tied, feed_forward_proj="relu" if tied else "gated-gelu")
    hf, ours = build(transformers.T5ForConditionalGeneration, T5ForConditionalGeneration, cfg, tmp_path)
    ids, mask = left_padded_batch()
    mask = mask[:, ::-1].copy()  # T5 prompts are right-padded
    labels = np.random.RandomState(1).randint(2, VOCAB, (3, 5))
    labels[0, 3:] = -100
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
        embeds = hf.get_input_embeddings()(torch.tensor(ids)).numpy()
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    out_e = ours(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=ours.shift_right(ms.Tensor(labels)))
    assert np.abs(out.logits.asnumpy() - ref.logits.numpy()).max() < 1e-4
    assert np.abs(out_e.logits.asnumpy() - ref.logits.numpy()).max() < 1e-4
    assert abs(float(out.loss) - float(ref.loss)) < 1e-4


def test_t5_relative_buckets_match_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    for bidirectional in (True, False):
        rel = torch.arange(-140, 141)
        ref = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32,
                                                     max_distance=128).numpy()
        table = relative_position_buckets(bidirectional, 32, 128)
        assert (table[np.clip(rel.numpy(), -128, 128) + 128] == ref).all()


# ----------------------------------------------------------------------------- generation parity


def test_opt_greedy_left_padded(opt):
    hf, ours = opt
    ids, mask = left_padded_batch()
    eos = frequent_token(hf, input_ids=ids, attention_mask=mask)
    kw = dict(max_new_tokens=8, eos_token_id=eos, pad_token_id=1)
    ref = hf_generate(hf, input_ids=ids, attention_mask=mask, **kw).numpy()
    got = ours.generate(input_ids=ids, attention_mask=mask, use_jit=False, **kw).sequences
    np.testing.assert_array_equal(got, ref)
    assert (ref[0, 6:] == 1).any(), "row 0 should finish early and be padded"

    with torch.no_grad():
        embeds = hf.get_input_embeddings()(torch.tensor(ids))
    ref = hf_generate(hf, inputs_embeds=embeds, attention_mask=mask, **kw).numpy()
    got = ours.generate(inputs_embeds=embeds.numpy(), attention_mask=mask, use_jit=False, **kw).sequences
    np.testing.assert_array_equal(got, ref)  # new tokens only

    ref = hf_generate(hf, input_ids=ids, inputs_embeds=embeds, attention_mask=mask, **kw).numpy()
    got = ours.generate(input_ids=ids, inputs_embeds=embeds.numpy(), attention_mask=mask, use_jit=False, **kw)
    np.testing.assert_array_equal(got.sequences, ref)  # prompt ids + new tokens


def test_opt_beam_search_all_beams(opt):
    hf, ours = opt
    ids, mask = left_padded_batch()
    eos = frequent_token(hf, input_ids=ids, attention_mask=mask)
    kw = dict(max_new_tokens=7, num_beams=3, num_return_sequences=3, eos_token_id=eos, pad_token_id=1,
              min_new_tokens=2)
    assert_beams_match(hf, ours, dict(input_ids=ids, attention_mask=mask), **kw)


def test_t5_greedy_and_beam(t5):
    hf, ours = t5
    ids, mask = left_padded_batch()
    mask = mask[:, ::-1].copy()
    eos = frequent_token(hf, input_ids=ids, attention_mask=mask)
    kw = dict(max_new_tokens=8, eos_token_id=eos)
    ref = hf_generate(hf, input_ids=ids, attention_mask=mask, **kw).numpy()
    got = ours.generate(input_ids=ids, attention_mask=mask, use_jit=False, **kw).sequences
    np.testing.assert_array_equal(got, ref)
    assert (got[:, 0] == 0).all()  # decoder_start_token_id first

    kw = dict(max_new_tokens=6, num_beams=3, num_return_sequences=3, eos_token_id=eos, length_penalty=0.7)
    assert_beams_match(hf, ours, dict(input_ids=ids, attention_mask=mask), **kw)


def test_t5_inputs_embeds_generation(t5):
    hf, ours = t5
    ids, _ = left_padded_batch()
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(torch.tensor(ids))
    ref = hf_generate(hf, inputs_embeds=embeds, max_new_tokens=5).numpy()
    got = ours.generate(inputs_embeds=embeds.numpy(), max_new_tokens=5, use_jit=False).sequences
    np.testing.assert_array_equal(got, ref)


def test_min_new_tokens_blocks_eos(opt):
    hf, ours = opt
    ids, mask = left_padded_batch()
    eos = int(hf_generate(hf, input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=1)[0, -1])
    kw = dict(max_new_tokens=6, eos_token_id=eos, pad_token_id=1)
    assert ours.generate(input_ids=ids[:1], attention_mask=mask[:1], use_jit=False, **kw).sequences.shape[1] == 7
    got = ours.generate(input_ids=ids[:1], attention_mask=mask[:1], use_jit=False, min_new_tokens=3, **kw)
    assert eos not in got.sequences[0, 6:9]
    ref = hf_generate(hf, input_ids=ids[:1], attention_mask=mask[:1], min_new_tokens=3, **kw).numpy()
    np.testing.assert_array_equal(got.sequences, ref)


def test_sampling_is_seeded(opt):
    _, ours = opt
    ids, mask = left_padded_batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=0, temperature=2.0,
              use_jit=False, eos_token_id=2, pad_token_id=1)
    first = ours.generate(seed=3, **kw).sequences
    np.testing.assert_array_equal(first, ours.generate(seed=np.random.default_rng(3), **kw).sequences)
    assert not np.array_equal(first, ours.generate(seed=4, **kw).sequences)
    greedy = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, use_jit=False).sequences
    top1 = ours.generate(**{**kw, "top_k": 1}, seed=5).sequences
    np.testing.assert_array_equal(top1, greedy)
    nucleus = ours.generate(**{**kw, "top_p": 1e-6}, seed=6).sequences
    np.testing.assert_array_equal(nucleus, greedy)


def test_jit_matches_pynative(opt, t5):
    ids, mask = left_padded_batch()
    _, ours = opt
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=2, num_return_sequences=2)
    eager, jit = ours.generate(use_jit=False, **kw), ours.generate(use_jit=True, **kw)
    np.testing.assert_array_equal(eager.sequences, jit.sequences)
    np.testing.assert_allclose(eager.sequences_scores, jit.sequences_scores, atol=1e-5)
    hf, ours = t5  # the BLIP-2 path: inputs_embeds into the encoder, beam search
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(torch.tensor(ids)).numpy()
    kw = dict(inputs_embeds=embeds, attention_mask=mask[:, ::-1].copy(), max_new_tokens=5, num_beams=2)
    eager, jit = ours.generate(use_jit=False, **kw), ours.generate(use_jit=True, **kw)
    np.testing.assert_array_equal(eager.sequences, jit.sequences)
    np.testing.assert_allclose(eager.sequences_scores, jit.sequences_scores, atol=1e-5)


# ----------------------------------------------------------------------------- repetition controls

REPEATS = dict(repetition_penalty=1.8, no_repeat_ngram_size=2)


def test_opt_repetition_controls_match_hf_in_greedy_and_beam(opt):
    hf, ours = opt
    ids, mask = left_padded_batch()
    kw = dict(max_new_tokens=10, pad_token_id=1, eos_token_id=2)
    plain = ours.generate(input_ids=ids, attention_mask=mask, use_jit=False, **kw).sequences
    for controls in (REPEATS, dict(repetition_penalty=0.6), dict(no_repeat_ngram_size=1)):
        ref = hf_generate(hf, input_ids=ids, attention_mask=mask, **kw, **controls).numpy()
        got = ours.generate(input_ids=ids, attention_mask=mask, use_jit=False, **kw, **controls).sequences
        np.testing.assert_array_equal(got, ref, err_msg=str(controls))
        assert not np.array_equal(got, plain), f"{controls} should change these captions"
    beams = dict(max_new_tokens=7, num_beams=3, num_return_sequences=3, pad_token_id=1, eos_token_id=2, **REPEATS)
    assert_beams_match(hf, ours, dict(input_ids=ids, attention_mask=mask), **beams)


def test_t5_repetition_controls_match_hf_in_greedy_and_beam(t5):
    hf, ours = t5
    ids, mask = left_padded_batch()
    mask = mask[:, ::-1].copy()
    kw = dict(max_new_tokens=10, **REPEATS)
    ref = hf_generate(hf, input_ids=ids, attention_mask=mask, **kw).numpy()
    got = ours.generate(input_ids=ids, attention_mask=mask, use_jit=False, **kw).sequences
    np.testing.assert_array_equal(got, ref)
    assert_beams_match(hf, ours, dict(input_ids=ids, attention_mask=mask),
                       max_new_tokens=6, num_beams=3, num_return_sequences=2, length_penalty=0.7, **REPEATS)


def test_repetition_controls_apply_before_sampling_warpers(opt):
    _, ours = opt
    ids, mask = left_padded_batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, use_jit=False, pad_token_id=1, eos_token_id=2,
              **REPEATS)
    greedy = ours.generate(**kw).sequences
    sampled_top1 = ours.generate(do_sample=True, top_k=1, temperature=0.7, seed=0, **kw).sequences
    np.testing.assert_array_equal(sampled_top1, greedy)


@pytest.mark.parametrize("bad, named", [
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(num_beams=0), "num_beams"), (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(do_sample=True, temperature=0.0), "temperature"), (dict(min_new_tokens=9, max_new_tokens=3), "min_new"),
])
def test_bad_generation_settings_are_named(opt, bad, named):
    _, ours = opt
    ids, mask = left_padded_batch()
    with pytest.raises(ValueError, match=named):
        ours.generate(input_ids=ids, attention_mask=mask, use_jit=False, **{"max_new_tokens": 4, **bad})
