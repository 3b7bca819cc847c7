"""Qwen3.5 vision-language port (models.qwen3_5.vision_language, ``qwen3_5`` and ``qwen3_5_moe``) against transformers
5.25 (PyTorch, fp32, tiny random weights saved with ``save_pretrained``): logits for an image prompt and a video prompt
(left-padded together), greedy ids of a left-padded batch and a 3-beam search, each row equal to transformers on that
prompt alone, for a 3:1 layer pattern with half of each head rotating (dense) and a 2:1 one with a quarter (MoE);
Qwen3-VL's vision tower without DeepStack; the checkpoint layouts (``mtp.*`` dropped, fused experts, a missing tensor
named); captioning through caption_qwen2vl.py with Qwen3-VL's processor, video rules and timestamps."""
from __future__ import annotations

import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.qwen3_5")

from mindspore import Tensor  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from models import from_pretrained, parallel  # noqa: E402
from models.checkpoint import CheckpointError  # noqa: E402
from models.qwen3_5.vision_language import Qwen3_5ForConditionalGeneration  # noqa: E402
from tests.test_qwen2vl import (  # noqa: E402
    CHAT_TEMPLATE, ENDOFTEXT, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, VOCAB, hf_generate, hf_inputs,
    left_pad, per_frame_video_rows, read_rows)
from tests.test_qwen3_vl import (  # noqa: E402
    EOS, IMAGE_GRID, SMALL_GRID, VIDEO_GRID, assert_beams_equal_transformers_one_by_one, image_prompt, pixels,
    save_checkpoint, video_prompt)

LINEAR, FULL = "linear_attention", "full_attention"
NEW_TOKENS = 8
# dense: 3:1 (three DeltaNet layers, then gated attention), half of each 32-channel head rotating: 16 rotary
# channels, M-RoPE sections [4, 2, 2] of their 8 frequencies (interleaved t h w t h w, then t t)
DENSE_TEXT = dict(num_hidden_layers=4, layer_types=[LINEAR, LINEAR, LINEAR, FULL], intermediate_size=96,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                   "mrope_section": [4, 2, 2], "mrope_interleaved": True})
# MoE: 2:1 (DeltaNet, attention, DeltaNet), a quarter rotating (8 channels, sections [2, 1, 1]), top-2 of 8 experts
# and a shared expert in every layer
MOE_TEXT = dict(num_hidden_layers=3, layer_types=[LINEAR, FULL, LINEAR], num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=24, shared_expert_intermediate_size=32,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [2, 1, 1], "mrope_interleaved": True})
TEXT = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_conv_kernel_dim=4, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=ENDOFTEXT,
            eos_token_id=IM_END, pad_token_id=ENDOFTEXT)
# Qwen3-VL's tiny tower (tests.test_qwen3_vl) without DeepStack: a 4 x 4 learned position grid, 16 px patches
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, in_channels=3,
              patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
              hidden_act="gelu_pytorch_tanh")


def hf_model(moe: bool = False, seed: int = 0):
    """transformers' tiny model with random weights around the initialisation's centre: zero for the 1 + weight
    RMSNorms, one for the DeltaNet's gated norm and the vision LayerNorms (noise std 0.1, see tests.test_qwen3_5)."""
    config_class = transformers.Qwen3_5MoeConfig if moe else transformers.Qwen3_5Config
    model_class = (transformers.Qwen3_5MoeForConditionalGeneration if moe
                   else transformers.Qwen3_5ForConditionalGeneration)
    config = config_class(text_config={**TEXT, **(MOE_TEXT if moe else DENSE_TEXT)}, vision_config=VISION,
                          image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
                          vision_end_token_id=VISION_END, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            layer_norm = ".visual." in name and "norm" in name and name.endswith("weight")
            centre = 1.0 if layer_norm or name.endswith("linear_attn.norm.weight") else 0.0
            p.copy_(centre + 0.1 * torch.randn(p.shape, generator=gen))
    return model


GENERATION_PROMPT = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
# Qwen3.5's generation prompt: a reasoning block opens unless enable_thinking is false (then it is written empty)
THINKING_TEMPLATE = CHAT_TEMPLATE.replace(GENERATION_PROMPT, (
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
    "enable_thinking is false %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}"))


def save_qwen3_5(folder: Path) -> Path:
    """The dense model with Qwen3-VL's tokenizer, processor and generation configs (tests.test_qwen3_vl), the chat
    template with Qwen3.5's thinking switch."""
    assert THINKING_TEMPLATE != CHAT_TEMPLATE
    save_checkpoint(folder, model=hf_model())
    template = folder / "chat_template.jinja"  # written in place: a tokenizer round trip drops its word-level rules
    assert template.read_text() == CHAT_TEMPLATE
    template.write_text(THINKING_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_qwen3_5(tmp_path_factory.mktemp("qwen3_5_vl"))


@pytest.fixture(scope="module")
def pair(checkpoint):
    hf = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(checkpoint).eval()
    ours = from_pretrained(checkpoint)
    assert isinstance(ours, Qwen3_5ForConditionalGeneration)
    return hf, ours


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen3_5_moe")
    hf_model(moe=True, seed=1).save_pretrained(folder)
    return folder


def image_and_video_batch():
    """Row 0: an image prompt; row 1 (longer, so row 0 is left-padded): a video of two temporal patches."""
    ids, mask = left_pad([image_prompt([22, 23]), video_prompt(2, VIDEO_GRID, [24, 25])])
    return ids, mask, dict(pixel_values=pixels(1, IMAGE_GRID), image_grid_thw=np.array([IMAGE_GRID]),
                           pixel_values_videos=pixels(2, (2, *VIDEO_GRID)), video_grid_thw=np.array([[2, *VIDEO_GRID]]))


def assert_logits_match(hf, ours) -> float:
    ids, mask, vision = image_and_video_batch()
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, mask, **vision)).logits.numpy()
    got = ours(input_ids=ids, attention_mask=mask, **vision).logits.asnumpy()
    diff = np.abs(got - ref)[mask == 1].max()
    assert diff < 1e-4, diff
    return diff


# ----------------------------------------------------------------------------- structure


def test_vision_tower_is_qwen3_vl_without_deepstack_and_layers_follow_the_config(pair):
    hf, ours = pair
    assert not hasattr(hf.model.visual, "deepstack_merger_list")
    assert len(ours.visual.deepstack_merger_list) == 0
    out = ours.visual(pixels(3, (1, *SMALL_GRID)), np.array([[1, *SMALL_GRID]]))
    assert isinstance(out, Tensor) and out.shape == (2, 64)  # the merged tokens alone, no DeepStack features
    assert [layer.linear for layer in ours.model.layers] == [True, True, True, False]
    assert ours.model.norm.unit_offset and ours.compile_prompt


def test_partial_interleaved_rotary_equals_transformers(pair):
    """The M-RoPE sections cover the rotary half of each head; cos/sin are that wide."""
    hf, ours = pair
    positions = np.random.RandomState(0).randint(0, 50, (3, 2, 7))
    want_cos, want_sin = hf.model.language_model.rotary_emb(torch.zeros(2, 7, 64), torch.tensor(positions))
    cos, sin = ours.model.rotary(Tensor(positions.transpose(1, 0, 2).astype(np.int32)))
    assert cos.shape == (2, 7, 16) == tuple(want_cos.shape)
    np.testing.assert_allclose(cos.asnumpy(), want_cos.numpy(), atol=1e-5)
    np.testing.assert_allclose(sin.asnumpy(), want_sin.numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- forward and generation parity


def test_logits_image_and_video_prompts(pair):
    hf, ours = pair
    ours.visual.use_jit = False  # PyNative here: the compiled shapes are the ones generation uses
    try:
        assert_logits_match(hf, ours)
    finally:
        ours.visual.use_jit = True


def test_greedy_left_padded_batch_equals_transformers_one_by_one(pair):
    """Videos of 1, 3 and 2 temporal patches of two sizes and an image with a video, left-padded into one call:
    each row's ids equal transformers' generate on that prompt alone, a finished row padded."""
    hf, ours = pair
    specs = [(1, VIDEO_GRID, [24]), (3, SMALL_GRID, [25, 26, 27]), (2, VIDEO_GRID, [28, 29])]
    prompts = [video_prompt(t, hw, words) for t, hw, words in specs]
    grids = [np.array([[t, *hw]]) for t, hw, _ in specs]
    rows = [pixels(10 + i, g[0]) for i, g in enumerate(grids)]
    prompts.append(image_prompt([26]) + video_prompt(1, SMALL_GRID, [27]))
    grids.append(np.array([[1, *SMALL_GRID]]))
    rows.append(pixels(20, grids[-1][0]))
    image = dict(pixel_values=pixels(21, IMAGE_GRID), image_grid_thw=np.array([IMAGE_GRID]))
    kw = dict(max_new_tokens=NEW_TOKENS, pad_token_id=ENDOFTEXT)

    def reference(i: int, eos: list[int]) -> np.ndarray:
        return hf_generate(hf, np.array([prompts[i]]), np.ones((1, len(prompts[i])), np.int64),
                           pixel_values_videos=rows[i], video_grid_thw=grids[i], **(image if i == 3 else {}), **kw,
                           eos_token_id=eos)[0]

    # row 1's third new token as an extra eos: that row ends early, then is padded
    eos = EOS + [int(reference(1, EOS)[len(prompts[1]) + 2])]
    refs = [reference(i, eos) for i in range(len(prompts))]
    ids, mask = left_pad(prompts)
    got = ours.generate(ids, mask, **image, pixel_values_videos=np.concatenate(rows),
                        video_grid_thw=np.concatenate(grids), **kw, eos_token_id=eos)
    for row, (prompt, ref) in enumerate(zip(prompts, refs)):
        pad = ids.shape[1] - len(prompt)
        np.testing.assert_array_equal(got[row, pad:pad + len(ref)], ref, err_msg=f"row {row}")
        assert (got[row, pad + len(ref):] == ENDOFTEXT).all()
    assert len(refs[1]) < len(prompts[1]) + NEW_TOKENS, "row 1 should end early"
    assert len({tuple(r) for r in got[:, ids.shape[1]:].tolist()}) > 1, "outputs should depend on the input"


def test_beam_search_equals_transformers_one_by_one(pair):
    """Every returned beam of a left-padded batch equals transformers' beam search on that prompt alone (the DeltaNet
    states and the attention cache are reordered with the beams)."""
    assert_beams_equal_transformers_one_by_one(*pair)


def test_moe_logits_equal_transformers(moe_checkpoint):
    hf = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(moe_checkpoint).eval()
    ours = from_pretrained(moe_checkpoint)
    assert isinstance(ours, Qwen3_5ForConditionalGeneration) and not ours.compile_prompt
    assert [layer.linear for layer in ours.model.layers] == [True, False, True]
    assert all(type(layer.mlp).__name__ == "SparseMoeBlock" and layer.mlp.shared_expert is not None
               for layer in ours.model.layers)
    assert ours.model.rotary.freq_table.shape == (3, 8)
    assert_logits_match(hf, ours)


# ----------------------------------------------------------------------------- checkpoints


def rewritten(checkpoint: Path, folder: Path, change) -> Path:
    """A copy of ``checkpoint``'s config and weights whose tensors ``change`` edits in place."""
    folder.mkdir()
    shutil.copy(checkpoint / "config.json", folder / "config.json")
    tensors = load_file(str(checkpoint / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def assert_same_parameters(a, b) -> None:
    for (name, x), (_, y) in zip(a.parameters_and_names(), b.parameters_and_names()):
        np.testing.assert_array_equal(x.asnumpy(), y.asnumpy(), err_msg=name)


def test_published_layouts_load_and_a_missing_tensor_is_named(moe_checkpoint, tmp_path):
    """transformers 5.25 saves the nested layout with per-expert matrices; Qwen's published weights add a
    multi-token-prediction head (``mtp.*``, dropped) and may hold the experts fused (the Qwen3-VL-MoE layout)."""
    saved = load_file(str(moe_checkpoint / "model.safetensors"))
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in saved} == {
        "lm_head.weight", "model.language_model", "model.visual"}
    assert "model.language_model.layers.0.mlp.experts.7.gate_proj.weight" in saved
    reference = from_pretrained(moe_checkpoint)

    def published(tensors: dict) -> None:
        tensors["mtp.fc.weight"] = np.ones((64, 128), np.float32)
        tensors["mtp.layers.0.mlp.experts.0.gate_proj.weight"] = np.ones((24, 64), np.float32)
        tensors["mtp.norm.weight"] = np.ones(64, np.float32)
        for layer in range(3):
            prefix = f"model.language_model.layers.{layer}.mlp.experts"
            experts = [[tensors.pop(f"{prefix}.{e}.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")]
                       for e in range(8)]
            # contiguous: safetensors' numpy writer stores a strided array's buffer as it lies
            tensors[f"{prefix}.gate_up_proj"] = np.ascontiguousarray(
                np.stack([np.concatenate([g, u]).T for g, u, _ in experts]))
            tensors[f"{prefix}.down_proj"] = np.ascontiguousarray(np.stack([d.T for _, _, d in experts]))

    assert_same_parameters(reference, from_pretrained(rewritten(moe_checkpoint, tmp_path / "published", published)))

    def drop(tensors: dict) -> None:
        del tensors["model.language_model.layers.1.self_attn.q_norm.weight"]
        del tensors["model.visual.pos_embed.weight"]

    with pytest.raises(CheckpointError, match=r"2 missing: model\.layers\.1\.self_attn\.q_norm\.weight, "
                                              r"visual\.pos_embed\.weight$"):
        from_pretrained(rewritten(moe_checkpoint, tmp_path / "missing", drop))


class _NoComm(parallel.Communicator):
    def reducer(self):
        return None

    def gatherer(self):
        return None


def test_each_tensor_parallel_rank_loads_its_heads_of_the_nested_checkpoint(checkpoint):
    """Under tp_size 2 (built as each rank, no collectives: msrun runs are tests.test_qwen3_5_parallel's) a rank
    loads from the nested layout its DeltaNet key head with its two value heads, its attention heads, half the
    MLP and the whole vision tower."""
    from models.checkpoint import load_checkpoint

    config = transformers.Qwen3_5Config.from_pretrained(checkpoint)
    full = load_file(str(checkpoint / "model.safetensors"))
    qkv = full["model.language_model.layers.0.linear_attn.in_proj_qkv.weight"]  # q 32 | k 32 | v 64 rows
    for rank in range(2):
        with parallel.building(parallel.TensorParallelGroup(size=2, rank=rank, comm=_NoComm())):
            model = load_checkpoint(Qwen3_5ForConditionalGeneration(config), checkpoint)
        params = {name: p.asnumpy() for name, p in model.parameters_and_names()}
        keys, values = np.r_[16 * rank:16 * rank + 16], np.r_[32 * rank:32 * rank + 32]
        np.testing.assert_array_equal(params["model.layers.0.linear_attn.in_proj_qkv.weight"],
                                      qkv[np.r_[keys, 32 + keys, 64 + values]])
        assert params["model.layers.0.linear_attn.out_proj.weight"].shape == (64, 32)
        assert params["model.layers.3.mlp.down_proj.weight"].shape == (64, 48)
        np.testing.assert_array_equal(params["visual.patch_embed.proj.weight"],
                                      full["model.visual.patch_embed.proj.weight"])


# ----------------------------------------------------------------------------- captioning entry script

QUESTION = "describe the video in detail"
# tests.test_qwen3_vl.SOURCES' first three: 1, 2 and 1.5 s
SOURCES = (("testsrc=decimals=0", 1.0), ("color=c=red", 2.0), ("cellauto=rule=110:random_seed=7", 1.5))
CLI = ["--height", "64", "--width", "96", "--max_frame_tokens", "6", "--max_new_tokens", "6", "--device", "CPU",
       "--no-cleanup", "--question", QUESTION]


def test_caption_qwen2vl_equals_transformers_one_by_one(pair, checkpoint, tmp_path):
    """config.json (``qwen3_5``) picks the model, Qwen3-VL's preset (2 fps, at least 4 frames) and its processor;
    a batch of 3 clips gives, row by row, transformers' greedy captions of our inputs for the frames and times the
    runner samples (pixel rows equal to transformers' image processor applied frame by frame; the prompt with a
    timestamp per temporal patch, rendered with ``enable_thinking=False``: a caption is the answer, not a reasoning
    block)."""
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    from pipeline.captioning.caption_qwen2vl import Qwen2VLCaptioner, main
    from pipeline.datasets.video import sample_frames
    from tests.video_factory import write_caption_clips

    hf, _ = pair
    clips = write_caption_clips(tmp_path, SOURCES, clip_id="c{}")
    out = tmp_path / "captions.csv"
    main([str(clips), "--pretrained_model_name_or_path", str(checkpoint), "--output", str(out), "--bs", "3", *CLI])
    rows = read_rows(out)
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["error"]

    captioner = Qwen2VLCaptioner(str(checkpoint), question=QUESTION, fps=2, height=64, width=96, max_new_tokens=6,
                                 max_frame_tokens=6)
    assert captioner.timestamps and type(captioner.processor).__name__ == "Qwen3VLVisionProcessor"
    assert captioner.prompt_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # no reasoning
    image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
    expected = {}
    for i in range(len(SOURCES)):
        frames, times = sample_frames(str(tmp_path / f"v{i}.mp4"), num_frames=768, fps=2, min_frames=4, height=64,
                                      width=96, return_times=True)
        inputs = captioner.prepare(frames, frame_times=times).inputs
        t, h, w = inputs.video_grid_thw[0]
        with mock.patch.object(pil, "smart_resize", lambda *args, **kwargs: (h * 16, w * 16)):
            want_rows, want_grid = per_frame_video_rows(image_processor, frames)
        np.testing.assert_array_equal(inputs.video_grid_thw, want_grid)
        np.testing.assert_allclose(inputs.pixel_values_videos, want_rows, atol=1e-6, rtol=0)
        assert inputs.input_ids.count(VISION_START) == t  # a timestamped vision run per temporal patch
        ids = np.array([inputs.input_ids])
        ref = hf_generate(hf, ids, np.ones_like(ids), pixel_values_videos=inputs.pixel_values_videos,
                          video_grid_thw=inputs.video_grid_thw, max_new_tokens=6, eos_token_id=EOS,
                          pad_token_id=ENDOFTEXT)
        expected[f"v{i}.mp4"] = captioner.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert {r["path"]: r["text"] for r in rows[:3]} == expected
    assert len(set(expected.values()) - {""}) >= 2, f"captions should depend on the video: {expected}"
    assert [int(r["num_frames_used"]) for r in rows[:3]] == [4, 4, 4]
