"""Qwen3-VL-MoE port and the MoE layer (models.moe): parity with transformers 5.25 (tiny random fp32) with
top-2 routing over 8 experts and a dense layer among the sparse ones; every expert path (grouped on the
host for prompts, gathered pairs and all experts for compiled one-token steps); the three expert layouts
users download; a rank's experts only."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mindspore import Tensor  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from models import from_pretrained, moe, parallel  # noqa: E402
from models.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration  # noqa: E402
from tests.test_qwen2vl import ENDOFTEXT, hf_generate, hf_inputs, left_pad, spread_weights  # noqa: E402
from tests.test_qwen3_vl import (  # noqa: E402
    EOS, SMALL_GRID, VIDEO_GRID, mixed_batch, pixels, tiny_config, video_prompt)

EXPERTS, TOP_K, EXPERT_INTER = 8, 2, 24  # 2 x 24 != hidden 64 and 24 != 64: the layouts differ in shape
NEW_TOKENS = 8


def moe_config() -> "transformers.Qwen3VLMoeConfig":
    """The dense tiny config's decoder with experts in layers 0 and 2 (``mlp_only_layers: [1]``)."""
    dense = tiny_config()
    text = {**dense.text_config.to_dict(), "num_experts": EXPERTS, "num_experts_per_tok": TOP_K,
            "moe_intermediate_size": EXPERT_INTER, "decoder_sparse_step": 1, "mlp_only_layers": [1]}
    for key in ("model_type", "architectures", "transformers_version"):
        text.pop(key, None)
    vision = {k: v for k, v in dense.vision_config.to_dict().items() if k not in ("model_type", "transformers_version")}
    return transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, image_token_id=dense.image_token_id,
                                         video_token_id=dense.video_token_id,
                                         vision_start_token_id=dense.vision_start_token_id,
                                         vision_end_token_id=dense.vision_end_token_id, tie_word_embeddings=False)


def hf_moe(seed: int = 0):
    torch.manual_seed(seed)
    return spread_weights(transformers.Qwen3VLMoeForConditionalGeneration(moe_config()).eval(), seed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen3_vl_moe")
    hf_moe().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pair(checkpoint):
    hf = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(checkpoint).eval()
    ours = from_pretrained(checkpoint)
    assert isinstance(ours, Qwen3VLForConditionalGeneration)
    return hf, ours


def test_sparse_and_dense_layers_as_the_config_says(pair):
    _, ours = pair
    kinds = [type(layer.mlp).__name__ for layer in ours.model.layers]
    assert kinds == ["SparseMoeBlock", "LlamaMLP", "SparseMoeBlock"]
    assert ours.model.layers[0].mlp.experts.gate_up_proj.shape == (EXPERTS, 64, 2 * EXPERT_INTER)
    assert not ours.compile_prompt


def test_logits_equal_transformers(pair):
    """An image and two videos, left-padded: the prompt path groups tokens by expert on the host."""
    hf, ours = pair
    ids, mask, vision = mixed_batch()
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, mask, **vision)).logits.numpy()
    got = ours(input_ids=ids, attention_mask=mask, **vision).logits.asnumpy()
    assert np.abs(got - ref)[mask == 1].max() < 1e-4, np.abs(got - ref)[mask == 1].max()


def _video_rows(specs, seed: int):
    prompts = [video_prompt(t, hw, words) for t, hw, words in specs]
    grids = [np.array([[t, *hw]]) for t, hw, _ in specs]
    rows = [pixels(seed + i, g[0]) for i, g in enumerate(grids)]
    return prompts, grids, rows


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_equals_transformers_one_by_one(pair, num_beams):
    """Greedy over 2 rows (2 x 2 picks <= 8 experts: each step gathers its pairs' experts) and 3 beams over
    2 rows (6 x 2 picks > 8: each step runs every expert); every row equals transformers on that prompt alone."""
    hf, ours = pair
    kw = dict(max_new_tokens=NEW_TOKENS, eos_token_id=EOS, pad_token_id=ENDOFTEXT, num_beams=num_beams,
              num_return_sequences=num_beams)
    prompts, grids, rows = _video_rows([(2, VIDEO_GRID, [24, 25]), (1, SMALL_GRID, [26])], 40 + num_beams)
    ids, mask = left_pad(prompts)
    got = ours.generate(ids, mask, pixel_values_videos=np.concatenate(rows), video_grid_thw=np.concatenate(grids),
                        **kw)
    for row, single in enumerate(prompts):
        single = np.array([single])
        ref = hf_generate(hf, single, np.ones_like(single), pixel_values_videos=rows[row], video_grid_thw=grids[row],
                          **kw)
        pad = ids.shape[1] - single.shape[1]
        mine = got[num_beams * row:num_beams * (row + 1), pad:]
        np.testing.assert_array_equal(mine[:, :ref.shape[1]], ref)
        assert (mine[:, ref.shape[1]:] == ENDOFTEXT).all()
    assert len({tuple(r) for r in got[:, ids.shape[1]:].tolist()}) > 1, "outputs should depend on the input"


def test_caption_csv_batched_equals_transformers_one_by_one(tmp_path):
    """caption_qwen2vl.py picks the MoE model and Qwen3-VL's preset by config.json; a batch of 4 clips (their
    prompts grouped by expert, then compiled one-token steps) gives transformers' captions one by one."""
    from pipeline.captioning.caption_qwen2vl import Qwen2VLCaptioner, main as qwen_main
    from tests.test_qwen2vl import read_rows
    from tests.test_qwen3_vl import CLI, QUESTION, SOURCES, reference_captions, save_checkpoint
    from tests.video_factory import write_caption_clips

    hf = hf_moe()
    folder = save_checkpoint(tmp_path / "model", model=hf)
    (tmp_path / "videos").mkdir()
    clips = write_caption_clips(tmp_path / "videos", SOURCES, clip_id="c{}")
    out = tmp_path / "captions.csv"
    qwen_main([str(clips), "--pretrained_model_name_or_path", str(folder), "--output", str(out), "--bs", "4", *CLI])
    rows = read_rows(out)
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["error"]
    captioner = Qwen2VLCaptioner(str(folder), question=QUESTION, fps=2, height=64, width=96, max_new_tokens=6,
                                 max_frame_tokens=6)
    assert {r["path"]: r["text"] for r in rows[:4]} == reference_captions(hf, captioner, clips)
    assert len({r["text"] for r in rows[:4]}) >= 3, "captions should depend on the video"


# ----------------------------------------------------------------------------- the layer itself


@pytest.fixture(scope="module")
def layer_pair():
    """transformers' sparse block and ours with the same weights; Qwen3-MoE's ``norm_topk_prob: false`` too."""
    config = moe_config().text_config
    torch.manual_seed(3)
    hf = transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe.Qwen3VLMoeTextSparseMoeBlock(config).eval()
    spread_weights(hf, 3)
    ours = moe.SparseMoeBlock(config)
    ours.gate.weight.set_data(Tensor(hf.gate.weight.detach().numpy()))
    ours.experts.gate_up_proj.set_data(Tensor(hf.experts.gate_up_proj.detach().numpy().transpose(0, 2, 1).copy()))
    ours.experts.down_proj.set_data(Tensor(hf.experts.down_proj.detach().numpy().transpose(0, 2, 1).copy()))
    return hf, ours


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "ops"])
@pytest.mark.parametrize("tokens", [1, 3, 37])
def test_every_expert_path_equals_transformers(layer_pair, tokens, fused, monkeypatch):
    """The host-grouped path (any token count) and the one-token paths: the fused kernel, or without it 1 token
    (2 picks: gathered pairs), 3 and 37 tokens (6 and 74 picks > 8 experts: all experts), give transformers'
    outputs."""
    from models import kernels

    assert kernels.active(), "the fused kernels should build here"
    if not fused:
        monkeypatch.setattr(kernels, "runs_on", lambda x: False)
    hf, ours = layer_pair
    x = np.random.default_rng(tokens).standard_normal((tokens, 64)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x)[None]).numpy()[0]
    flat = Tensor(x)
    ids, weights = ours.route(flat)
    assert np.allclose(weights.asnumpy().sum(-1), 1, atol=1e-6)
    picked = set(ids.asnumpy().reshape(-1).tolist())
    assert tokens < 37 or len(picked) == EXPERTS
    for one_step in (False, True):
        got = moe.run_experts(flat, ids, weights, ours.experts, one_step=one_step).asnumpy()
        assert np.abs(got - ref).max() < 1e-5, (one_step, np.abs(got - ref).max())


def test_unnormalised_top_k(layer_pair):
    """Qwen3-MoE's ``norm_topk_prob: false`` keeps the softmax weights as they are."""
    _, ours = layer_pair
    x = Tensor(np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32))
    ours.normalise = False
    try:
        ids, weights = ours.route(x)
    finally:
        ours.normalise = True
    logits = x.asnumpy() @ ours.gate.weight.asnumpy().T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(weights.asnumpy(), np.take_along_axis(probs, ids.asnumpy().astype(np.int64), 1),
                               atol=1e-6)
    assert (weights.asnumpy().sum(-1) < 1).all()


def test_a_rank_computes_only_its_experts_share(layer_pair):
    """Split over 2 ranks (built without a communicator), each rank's share sums to the whole output, on
    every path; experts [4, 8) are rank 1's."""
    hf, ours = layer_pair
    config = moe_config().text_config
    x = Tensor(np.random.default_rng(5).standard_normal((9, 64)).astype(np.float32))
    ids, weights = ours.route(x)
    for one_step in (False, True):
        whole = moe.run_experts(x, ids, weights, ours.experts, one_step).asnumpy()
        shares = []
        for rank in range(2):
            with parallel.building(parallel.TensorParallelGroup(size=2, rank=rank, comm=_NoComm())):
                part = moe.SparseMoeBlock(config)
            assert (part.experts.first, part.experts.count) == (4 * rank, 4)
            part.experts.gate_up_proj.set_data(ours.experts.gate_up_proj[4 * rank:4 * rank + 4])
            part.experts.down_proj.set_data(ours.experts.down_proj[4 * rank:4 * rank + 4])
            shares.append(moe.run_experts(x, ids, weights, part.experts, one_step).asnumpy())
        np.testing.assert_allclose(shares[0] + shares[1], whole, atol=1e-5)
        assert np.abs(shares[0]).max() > 0 and np.abs(shares[1]).max() > 0


class _NoComm(parallel.Communicator):
    def reducer(self):
        return None

    def gatherer(self):
        return None


def test_experts_that_do_not_divide_over_ranks_fail_in_one_line():
    config = moe_config().text_config
    with parallel.building(parallel.TensorParallelGroup(size=3, rank=0, comm=_NoComm())):
        with pytest.raises(parallel.TensorParallelError, match=r"^num_experts \(8\) is not divisible by tp_size 3"):
            moe.SparseMoeBlock(config)


# ----------------------------------------------------------------------------- checkpoint layouts


def _rewrite(checkpoint: Path, folder: Path, change, version: str | None = None) -> Path:
    """A copy of the checkpoint with its tensors changed by ``change(dict)`` (and config.json's writer version)."""
    folder.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    if version is not None:
        config["transformers_version"] = version
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(checkpoint / "model.safetensors"))
    save_file(change(tensors), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _published(tensors: dict) -> dict:
    """Qwen's published layout: experts (E, hidden, 2 inter) and (E, inter, hidden)."""
    return {k: (np.ascontiguousarray(v.transpose(0, 2, 1)) if ".mlp.experts." in k else v) for k, v in tensors.items()}


def _per_expert(tensors: dict) -> dict:
    """One matrix per expert and projection, as Qwen3-MoE and the FP8 releases store them."""
    out = {}
    for name, value in tensors.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name[:-len("gate_up_proj")]
            for e, matrix in enumerate(value):  # transformers 5: (2 inter, hidden) per expert
                out[f"{prefix}{e}.gate_proj.weight"] = np.ascontiguousarray(matrix[:EXPERT_INTER])
                out[f"{prefix}{e}.up_proj.weight"] = np.ascontiguousarray(matrix[EXPERT_INTER:])
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name[:-len("down_proj")]
            for e, matrix in enumerate(value):  # (hidden, inter): a Linear's (out, in)
                out[f"{prefix}{e}.down_proj.weight"] = np.ascontiguousarray(matrix)
        else:
            out[name] = value
    return out


def test_saved_layout_is_transposed_from_the_published_one(checkpoint):
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert saved["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (EXPERTS, 2 * EXPERT_INTER, 64)
    assert saved["model.language_model.layers.0.mlp.experts.down_proj"].shape == (EXPERTS, 64, EXPERT_INTER)
    assert "model.language_model.layers.1.mlp.gate_proj.weight" in saved  # the dense layer


def test_every_expert_layout_loads_the_same_weights(pair, checkpoint, tmp_path):
    _, ours = pair
    want = {name: p.asnumpy() for name, p in ours.parameters_and_names()}
    for name, change in (("published", _published), ("per_expert", _per_expert)):
        other = from_pretrained(_rewrite(checkpoint, tmp_path / name, change, version="4.57.0"))
        for param_name, p in other.parameters_and_names():
            np.testing.assert_array_equal(p.asnumpy(), want[param_name], err_msg=f"{name}: {param_name}")


def test_a_rank_reads_only_its_experts(checkpoint, tmp_path):
    """Rank 1 of 2 loads experts 4..7 from the published and the per-expert layouts."""
    saved = load_file(str(checkpoint / "model.safetensors"))
    expected = saved["model.language_model.layers.2.mlp.experts.down_proj"][4:].transpose(0, 2, 1)
    config = transformers.Qwen3VLMoeConfig.from_pretrained(checkpoint)
    for name, change in (("published", _published), ("per_expert", _per_expert)):
        folder = _rewrite(checkpoint, tmp_path / name, change, version="4.57.0")
        with parallel.building(parallel.TensorParallelGroup(size=2, rank=1, comm=_NoComm())):
            model = Qwen3VLForConditionalGeneration(config)
        load_checkpoint(model, folder)
        np.testing.assert_array_equal(model.model.layers[2].mlp.experts.down_proj.asnumpy(), expected, err_msg=name)


def test_square_experts_follow_the_writer(tmp_path):
    """With hidden = 2 inter the two fused layouts have one shape: a transformers 5 config.json means transposed."""
    from models.checkpoint import TensorRef

    stored = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    for by_5, expected in ((True, stored.transpose(0, 2, 1)), (False, stored)):
        tensors = {"layers.0.mlp.experts.gate_up_proj": TensorRef(stored.shape, lambda: stored)}
        moe.adapt_expert_tensors(tensors, hidden=4, inter=2, saved_by_transformers_5=by_5)
        np.testing.assert_array_equal(tensors["layers.0.mlp.experts.gate_up_proj"].read(), expected)


def test_missing_expert_matrix_is_named(checkpoint, tmp_path):
    def drop(tensors):
        out = _per_expert(tensors)
        del out["model.language_model.layers.2.mlp.experts.5.up_proj.weight"]
        return out

    with pytest.raises(CheckpointError, match=r"layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        from_pretrained(_rewrite(checkpoint, tmp_path / "broken", drop))

