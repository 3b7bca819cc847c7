"""BLIP-2 video captioner and checkpoint loader against transformers (PyTorch, fp32) on tiny random models."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import Blip2ForConditionalGeneration as HFBlip2

from models import from_pretrained
from models.blip2.qformer import Blip2QFormerModel
from models.blip2.vision import Blip2VisionModel
from models.checkpoint import CheckpointError, load_checkpoint
from tests.tiny_models import IMAGE_TOKEN, NUM_QUERY, OPT, T5, hf_blip2

ms.set_device("CPU")
torch.set_num_threads(1)
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_opt() -> HFBlip2:
    return hf_blip2(OPT)


def pixels(*shape: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _ms_vision(hf: HFBlip2, folder: Path) -> Blip2VisionModel:
    hf.vision_model.save_pretrained(folder)
    return load_checkpoint(Blip2VisionModel(hf.config.vision_config), folder)


# ---------------------------------------------------------------- vision encoder and Q-Former


def test_vision_matches_hf(hf_opt, tmp_path):
    ours = _ms_vision(hf_opt, tmp_path)
    x = pixels(3, 3, 28, 28)
    with torch.no_grad():
        ref = hf_opt.vision_model(torch.from_numpy(x)).last_hidden_state.numpy()
    got = ours(ms.Tensor(x)).asnumpy()
    assert got.shape == ref.shape == (3, 5, 32)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_qformer_matches_hf_over_frames(hf_opt, tmp_path):
    """Queries cross-attend over several frames' tokens at once (B, T*N, D)."""
    hf_opt.qformer.save_pretrained(tmp_path)
    ours = load_checkpoint(Blip2QFormerModel(hf_opt.config.qformer_config), tmp_path)
    states = pixels(2, 3 * 5, 32)
    queries = np.broadcast_to(hf_opt.query_tokens.detach().numpy(), (2, NUM_QUERY, 32)).copy()
    with torch.no_grad():
        ref = hf_opt.qformer(query_embeds=torch.from_numpy(queries),
                             encoder_hidden_states=torch.from_numpy(states)).last_hidden_state.numpy()
    got = ours(ms.Tensor(queries), ms.Tensor(states)).asnumpy()
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- loader


def test_sharded_checkpoint_loads(hf_opt, tmp_path):
    hf_opt.vision_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ours = load_checkpoint(Blip2VisionModel(hf_opt.config.vision_config), tmp_path)
    x = pixels(1, 3, 28, 28)
    with torch.no_grad():
        ref = hf_opt.vision_model(torch.from_numpy(x)).last_hidden_state.numpy()
    np.testing.assert_allclose(ours(ms.Tensor(x)).asnumpy(), ref, atol=ATOL, rtol=0)


def test_bfloat16_checkpoint_and_dtype(hf_opt, tmp_path):
    vision = Blip2VisionModel(hf_opt.config.vision_config)
    hf_bf16 = HFBlip2(hf_opt.config).vision_model
    hf_bf16.load_state_dict(hf_opt.vision_model.state_dict())
    hf_bf16.to(torch.bfloat16).save_pretrained(tmp_path)
    load_checkpoint(vision, tmp_path)
    name = "encoder.layers.0.mlp.fc1.weight"
    expected = hf_bf16.state_dict()[name].float().numpy()
    got = dict(vision.parameters_and_names())[name]
    assert got.dtype == ms.float32
    np.testing.assert_array_equal(got.asnumpy(), expected)
    load_checkpoint(vision, tmp_path, dtype="float16")
    assert dict(vision.parameters_and_names())[name].dtype == ms.float16


def test_lavis_q_v_bias_layout_loads(hf_opt, tmp_path):
    """Checkpoints with separate q_bias/v_bias load into the fused qkv bias."""
    hf_opt.vision_model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for key in [k for k in tensors if k.endswith("self_attn.qkv.bias")]:
        q, _, v = np.split(tensors.pop(key), 3)
        tensors[key.replace("qkv.bias", "q_bias")] = q
        tensors[key.replace("qkv.bias", "v_bias")] = v
    save_file(tensors, tmp_path / "model.safetensors")
    ours = _load_vision_with_hook(hf_opt, tmp_path)
    x = pixels(1, 3, 28, 28)
    with torch.no_grad():
        ref = hf_opt.vision_model(torch.from_numpy(x)).last_hidden_state.numpy()
    np.testing.assert_allclose(ours(ms.Tensor(x)).asnumpy(), ref, atol=ATOL, rtol=0)


def _load_vision_with_hook(hf: HFBlip2, folder: Path) -> Blip2VisionModel:
    from models.blip2.vision import merge_q_v_bias

    class Vision(Blip2VisionModel):
        def checkpoint_hook(self, tensors):
            merge_q_v_bias(tensors)

    return load_checkpoint(Vision(hf.config.vision_config), folder)


def _rewrite(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_tensor_is_named(hf_opt, tmp_path):
    hf_opt.vision_model.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"1 missing: encoder\.layers\.1\.mlp\.fc2\.bias") as err:
        load_checkpoint(Blip2VisionModel(hf_opt.config.vision_config), tmp_path)
    assert str(tmp_path) in str(err.value)


def test_renamed_tensor_is_missing_and_unexpected(hf_opt, tmp_path):
    hf_opt.vision_model.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__("encoder.layers.0.mlp.fc9.weight",
                                                t.pop("encoder.layers.0.mlp.fc1.weight")))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(Blip2VisionModel(hf_opt.config.vision_config), tmp_path)
    assert "missing: encoder.layers.0.mlp.fc1.weight" in str(err.value)
    assert "unexpected: encoder.layers.0.mlp.fc9.weight" in str(err.value)


def test_shape_mismatch_is_named(hf_opt, tmp_path):
    hf_opt.vision_model.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__("post_layernorm.bias", np.zeros(7, np.float32)))
    with pytest.raises(CheckpointError, match=r"post_layernorm\.bias \(checkpoint \(7,\), model \(32,\)\)"):
        load_checkpoint(Blip2VisionModel(hf_opt.config.vision_config), tmp_path)


def test_folder_without_config_or_weights(hf_opt, tmp_path):
    with pytest.raises(CheckpointError, match="No config.json in"):
        from_pretrained(tmp_path)
    hf_opt.config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"No weights in .*model\.safetensors"):
        from_pretrained(tmp_path)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match=r"bert.*blip-2"):
        from_pretrained(tmp_path)


# ---------------------------------------------------------------- full captioner (OPT and T5)

LMS = {"opt": OPT, "t5": T5}
FRAMES = 3
PROMPT = 5


def _has_lm(kind: str) -> bool:
    return (Path(__file__).resolve().parents[1] / "models" / f"{kind}.py").is_file()


@pytest.fixture(scope="module", params=["opt", "t5"])
def pair(request, tmp_path_factory):
    """(HF model, our model loaded through from_pretrained) for one language model family."""
    if not _has_lm(request.param):
        pytest.skip(f"models/{request.param}.py not written yet")
    hf = hf_blip2(LMS[request.param], seed=3)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, from_pretrained(folder)


def prompts(batch: int, image_tokens: bool, seed: int = 2, pad_first: int = 2):
    """Prompt ids (image placeholders + BOS + text) with the first row left-padded, and its mask."""
    rng = np.random.default_rng(seed)
    text = rng.integers(3, IMAGE_TOKEN, size=(batch, PROMPT))
    head = [IMAGE_TOKEN] * NUM_QUERY if image_tokens else []
    ids = np.array([head + [2] + list(row) for row in text], np.int64)
    mask = np.ones_like(ids)
    ids[0] = np.concatenate([np.ones(pad_first, np.int64), ids[0, :-pad_first]])
    mask[0, :pad_first] = 0
    return ids, mask


def composed_reference(hf: HFBlip2, pixel_values: np.ndarray, input_ids: np.ndarray, mask: np.ndarray,
                       grad: bool = False):
    """LM input embeddings built from HF submodules: B*T frames -> (B, T*N, D) -> Q-Former -> projection."""
    b, t = pixel_values.shape[:2]
    with torch.set_grad_enabled(grad):
        frames = hf.vision_model(torch.from_numpy(pixel_values.reshape((b * t,) + pixel_values.shape[2:])))
        tokens = frames.last_hidden_state.reshape(b, -1, frames.last_hidden_state.shape[-1])
        queries = hf.qformer(query_embeds=hf.query_tokens.expand(b, -1, -1),
                             encoder_hidden_states=tokens).last_hidden_state
        image = hf.language_projection(queries)
        ids = torch.from_numpy(input_ids)
        embeds = hf.get_input_embeddings()(ids).clone()
        slots = ids == IMAGE_TOKEN if hf.config.image_token_index is not None else torch.zeros_like(ids).bool()
        if slots.any():
            embeds[slots] = image.reshape(-1, image.shape[-1])
            return embeds, torch.from_numpy(mask)
        full_mask = torch.cat([torch.ones(b, NUM_QUERY, dtype=torch.long), torch.from_numpy(mask)], 1)
        return torch.cat([image, embeds], 1), full_mask


def hf_logits(hf: HFBlip2, embeds, mask, decoder_ids=None) -> np.ndarray:
    with torch.no_grad():
        if hf.config.use_decoder_only_language_model:
            return hf.language_model(inputs_embeds=embeds, attention_mask=mask).logits.numpy()
        return hf.language_model(inputs_embeds=embeds, attention_mask=mask,
                                 decoder_input_ids=torch.from_numpy(decoder_ids)).logits.numpy()


def decoder_ids(batch: int) -> np.ndarray:
    return np.random.default_rng(5).integers(2, IMAGE_TOKEN, size=(batch, 4))


def video_logits_vs_reference(hf: HFBlip2, ours, seed: int, image_tokens: bool):
    """Our logits and the composed reference's for a (2, FRAMES) video batch, plus the inputs used."""
    x = pixels(2, FRAMES, 3, 28, 28, seed=seed)
    ids, mask = prompts(2, image_tokens=image_tokens)
    embeds, full_mask = composed_reference(hf, x, ids, mask)
    dec = None if hf.config.use_decoder_only_language_model else decoder_ids(2)
    kwargs = {} if dec is None else {"decoder_input_ids": dec}
    got = ours(pixel_values=x, input_ids=ids, attention_mask=mask, **kwargs).logits.asnumpy()
    used = SimpleNamespace(x=x, ids=ids, mask=mask, kwargs=kwargs, embeds=embeds, full_mask=full_mask, dec=dec)
    return got, hf_logits(hf, embeds, full_mask, dec), used


def assert_logits_match(hf: HFBlip2, got: np.ndarray, ref: np.ndarray, mask) -> None:
    """Equal logits at the real positions of ``mask``, the language model's input mask (decoder-only models).

    Logits at left padding carry no meaning: a query that sees only padding gets a zero attention output in
    transformers 5 and a uniform one here, so they are not compared. T5's logits are the decoder's, all real.
    """
    if hf.config.use_decoder_only_language_model:
        real = np.asarray(mask) == 1
        got, ref = got[real], ref[real]
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_image_logits_match_hf(pair):
    hf, ours = pair
    x = pixels(2, 3, 28, 28)
    ids, mask = prompts(2, image_tokens=True)
    kwargs = {} if hf.config.use_decoder_only_language_model else {"decoder_input_ids": decoder_ids(2)}
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(x), input_ids=torch.from_numpy(ids),
                 attention_mask=torch.from_numpy(mask),
                 **{k: torch.from_numpy(v) for k, v in kwargs.items()}).logits.numpy()
    got = ours(pixel_values=x, input_ids=ids, attention_mask=mask, **kwargs).logits.asnumpy()
    assert_logits_match(hf, got, ref, mask)


def test_loss_matches_hf(pair):
    hf, ours = pair
    x = pixels(2, 3, 28, 28)
    ids, mask = prompts(2, image_tokens=True)
    if hf.config.use_decoder_only_language_model:
        labels = np.where(mask == 1, ids, -100)
        labels[:, :NUM_QUERY + 2] = -100
        kwargs = {"labels": labels}
    else:
        labels = decoder_ids(2)
        labels[1, -1] = -100
        kwargs = {"labels": labels}
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(x), input_ids=torch.from_numpy(ids),
                 attention_mask=torch.from_numpy(mask),
                 **{k: torch.from_numpy(v) for k, v in kwargs.items()}).loss.item()
    got = ours(pixel_values=x, input_ids=ids, attention_mask=mask, **kwargs).loss.asnumpy()
    assert abs(float(got) - ref) < ATOL


def test_video_logits_match_composed_reference(pair):
    hf, ours = pair
    got, ref, used = video_logits_vs_reference(hf, ours, seed=7, image_tokens=True)
    x, ids, mask, kwargs = used.x, used.ids, used.mask, used.kwargs
    assert_logits_match(hf, got, ref, used.full_mask)
    single = ours(pixel_values=x[:, :1], input_ids=ids, attention_mask=mask, **kwargs).logits.asnumpy()
    image = ours(pixel_values=x[:, 0], input_ids=ids, attention_mask=mask, **kwargs).logits.asnumpy()
    np.testing.assert_allclose(single, image, atol=1e-6, rtol=0)  # T=1 is plain image BLIP-2


def test_image_generation_matches_hf(pair):
    hf, ours = pair
    x = pixels(2, 3, 28, 28, seed=11)
    ids, mask = prompts(2, image_tokens=True)
    with torch.no_grad():
        ref = hf.generate(pixel_values=torch.from_numpy(x), input_ids=torch.from_numpy(ids),
                          attention_mask=torch.from_numpy(mask), max_new_tokens=6, do_sample=False).numpy()
    got = ours.generate(pixel_values=x, input_ids=ids, attention_mask=mask, max_new_tokens=6)
    np.testing.assert_array_equal(got, ref)
    if hf.config.use_decoder_only_language_model:  # no prompt: image tokens + BOS, as transformers
        with torch.no_grad():
            ref = hf.generate(pixel_values=torch.from_numpy(x), max_new_tokens=4, do_sample=False).numpy()
        np.testing.assert_array_equal(ours.generate(pixel_values=x, max_new_tokens=4), ref)


def test_prompt_without_placeholders_is_prepended(pair):
    """A config with image_token_index but a prompt without image tokens: queries go in front."""
    hf, ours = pair
    got, ref, used = video_logits_vs_reference(hf, ours, seed=23, image_tokens=False)
    assert_logits_match(hf, got, ref, used.full_mask)


def test_qformer_training_gradients_match_torch(pair):
    """Q-Former-only fine-tuning: value_and_grad through the compiled video encoder equals torch autograd."""
    hf, ours = pair
    x = pixels(2, FRAMES, 3, 28, 28, seed=29)
    ids, mask = prompts(2, image_tokens=True)
    if hf.config.use_decoder_only_language_model:
        labels = np.where(mask == 1, ids, -100)
        labels[:, :NUM_QUERY + 2] = -100
    else:
        labels = decoder_ids(2)
    embeds, full_mask = composed_reference(hf, x, ids, mask, grad=True)
    if hf.config.use_decoder_only_language_model:
        logits = hf.language_model(inputs_embeds=embeds, attention_mask=full_mask).logits
        ref_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     torch.from_numpy(labels[:, 1:]).reshape(-1))
    else:
        ref_loss = hf.language_model(inputs_embeds=embeds, attention_mask=full_mask,
                                     labels=torch.from_numpy(labels)).loss
    hf.zero_grad()
    ref_loss.backward()
    trainable = ("qformer.", "query_tokens", "language_projection.")
    names, params = zip(*[(n, p) for n, p in ours.parameters_and_names() if n.startswith(trainable)])
    loss, grads = ms.value_and_grad(
        lambda: ours(pixel_values=x, input_ids=ids, attention_mask=mask, labels=labels).loss, None, list(params))()
    assert abs(float(loss.asnumpy()) - ref_loss.item()) < ATOL
    hf_params = dict(hf.named_parameters())
    for name, grad in zip(names, grads):
        np.testing.assert_allclose(grad.asnumpy(), hf_params[name].grad.numpy(), atol=1e-3, rtol=0, err_msg=name)


def test_float16_keeps_qformer_in_float32(pair, tmp_path):
    hf, ours = pair
    hf.save_pretrained(tmp_path)
    half = from_pretrained(tmp_path, dtype="float16")
    dtypes = dict((n, p.dtype) for n, p in half.parameters_and_names())
    assert dtypes["query_tokens"] == dtypes["qformer.layernorm.weight"] == ms.float32
    assert dtypes["vision_model.post_layernorm.weight"] == dtypes["language_projection.weight"] == ms.float16
    x = pixels(2, FRAMES, 3, 28, 28, seed=31)
    ids, mask = prompts(2, image_tokens=True)
    kwargs = {} if hf.config.use_decoder_only_language_model else {"decoder_input_ids": decoder_ids(2)}
    full = ours(pixel_values=x, input_ids=ids, attention_mask=mask, **kwargs).logits.asnumpy()
    low = half(pixel_values=x, input_ids=ids, attention_mask=mask, **kwargs).logits
    assert low.dtype == ms.float16
    np.testing.assert_allclose(low.astype(ms.float32).asnumpy(), full, atol=0.1, rtol=0)


def test_image_beam_search_matches_hf(pair):
    hf, ours = pair
    x = pixels(2, 3, 28, 28, seed=13)
    ids, mask = prompts(2, image_tokens=True)
    with torch.no_grad():
        ref = hf.generate(pixel_values=torch.from_numpy(x), input_ids=torch.from_numpy(ids),
                          attention_mask=torch.from_numpy(mask), max_new_tokens=6, num_beams=3,
                          num_return_sequences=3, do_sample=False, return_dict_in_generate=True,
                          output_scores=True)
    got = ours.generate(pixel_values=x, input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3,
                        num_return_sequences=3, return_dict_in_generate=True)
    np.testing.assert_array_equal(got.sequences, ref.sequences.numpy())
    np.testing.assert_allclose(got.sequences_scores, ref.sequences_scores.numpy(), atol=ATOL)


def test_video_generation_matches_composed_reference(pair):
    hf, ours = pair
    x = pixels(2, FRAMES, 3, 28, 28, seed=17)
    ids, mask = prompts(2, image_tokens=True)
    embeds, full_mask = composed_reference(hf, x, ids, mask)
    for beams in (1, 3):
        with torch.no_grad():
            ref = hf.language_model.generate(inputs_embeds=embeds, attention_mask=full_mask, max_new_tokens=6,
                                             num_beams=beams, num_return_sequences=beams,
                                             do_sample=False).numpy()
        if hf.config.use_decoder_only_language_model:
            ref = np.concatenate([np.repeat(ids, beams, axis=0), ref], axis=1)
        got = ours.generate(pixel_values=x, input_ids=ids, attention_mask=mask, max_new_tokens=6,
                            num_beams=beams, num_return_sequences=beams)
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_prepend_layout_videoblip_config(kind, tmp_path):
    """No image_token_index (earlier BLIP-2, VideoBLIP): query outputs are prepended to the prompt."""
    if not _has_lm(kind):
        pytest.skip(f"models/{kind}.py not written yet")
    hf = hf_blip2(LMS[kind], image_token=False, seed=4)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["VideoBlipForConditionalGeneration"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = from_pretrained(tmp_path)
    got, ref, used = video_logits_vs_reference(hf, ours, seed=19, image_tokens=False)
    assert_logits_match(hf, got, ref, used.full_mask)
    with torch.no_grad():
        ref = hf.language_model.generate(inputs_embeds=used.embeds, attention_mask=used.full_mask,
                                         max_new_tokens=5, do_sample=False).numpy()
    if used.dec is None:
        ref = np.concatenate([used.ids, ref], axis=1)
    np.testing.assert_array_equal(ours.generate(pixel_values=used.x, input_ids=used.ids, attention_mask=used.mask,
                                                max_new_tokens=5), ref)


TIED_COPIES = {
    "opt": {"language_model.lm_head.weight": "language_model.model.decoder.embed_tokens.weight"},
    "t5": {"language_model.encoder.embed_tokens.weight": "language_model.shared.weight",
           "language_model.decoder.embed_tokens.weight": "language_model.shared.weight"},
}


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_published_layout_with_tied_copies(kind, tmp_path):
    """Older saves keep copies of tied embeddings (OPT lm_head, T5 embed_tokens): they load, not 'unexpected'."""
    if not _has_lm(kind):
        pytest.skip(f"models/{kind}.py not written yet")
    hf = hf_blip2(LMS[kind], seed=6)
    hf.save_pretrained(tmp_path)

    def add_copies(tensors):
        for copy, source in TIED_COPIES[kind].items():
            tensors[copy] = tensors[source].copy()

    _rewrite(tmp_path, add_copies)
    from_pretrained(tmp_path)


def test_flan_t5_config_as_transformers_4_wrote_it(tmp_path):
    """Published BLIP-2 Flan-T5 configs mark the own lm_head and unscaled output only by the text config's
    ``tie_word_embeddings: false``; transformers 5 writes ``tie_word_embeddings: true`` and
    ``scale_decoder_outputs: false`` instead. Both load as the same model."""
    hf = hf_blip2(T5, seed=8)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["text_config"]["scale_decoder_outputs"] is False
    del config["text_config"]["scale_decoder_outputs"]
    config["text_config"]["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    got, ref, used = video_logits_vs_reference(hf, from_pretrained(tmp_path), seed=37, image_tokens=True)
    assert_logits_match(hf, got, ref, used.full_mask)


def test_rename_rules_of_a_sub_cell(hf_opt, tmp_path):
    """A Cell's checkpoint_rename_rules apply to the keys below it (here LAVIS names for the last norm)."""
    from models.checkpoint import open_checkpoint

    class Vision(Blip2VisionModel):
        checkpoint_rename_rules = [(r"^ln_vision\.", "post_layernorm.")]

    class Wrapper(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            self.vision_model = Vision(hf_opt.config.vision_config)

    hf_opt.vision_model.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__("ln_vision.weight", t.pop("post_layernorm.weight")))
    _rewrite(tmp_path, lambda t: t.update({f"vision_model.{k}": t.pop(k) for k in list(t)}))
    assert "vision_model.ln_vision.weight" in open_checkpoint(tmp_path)
    model = load_checkpoint(Wrapper(), tmp_path)
    np.testing.assert_array_equal(model.vision_model.post_layernorm.weight.asnumpy(),
                                  hf_opt.vision_model.post_layernorm.weight.detach().numpy())


def test_family_from_architectures():
    from models import model_family

    videoblip = ["VideoBlipForConditionalGeneration"]
    assert model_family({"architectures": videoblip}) == "blip-2"
    assert model_family({"model_type": "blip-2", "architectures": videoblip}) == "blip-2"
