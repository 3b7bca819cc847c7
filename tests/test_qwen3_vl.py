"""Qwen3-VL (dense) port: parity with transformers 5 (tiny random fp32) for an image and videos written as
Qwen3-VL writes them (one vision run per temporal patch), DeepStack, interleaved M-RoPE, left-padded
batches, checkpoint layouts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mindspore import Tensor  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from models import from_pretrained  # noqa: E402
from models.checkpoint import CheckpointError  # noqa: E402
from models.qwen2_vl.modeling import MultimodalRotary  # noqa: E402
from models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration, get_rope_index  # noqa: E402
from tests.test_qwen2vl import (  # noqa: E402
    ENDOFTEXT, IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, VOCAB, hf_generate, hf_inputs,
    left_pad, mm_token_types, spread_weights)

NEW_TOKENS = 8
EOS = [IM_END, ENDOFTEXT]
PATCH_ROW = 3 * 2 * 16 * 16  # channels x temporal patch x 16 x 16 px
# The learned position grid is 4 x 4; the image (4 x 6 patches) and the videos (6 x 4, 2 x 4 patches) resample it.
IMAGE_GRID, VIDEO_GRID, SMALL_GRID = (1, 4, 6), (6, 4), (2, 4)


def tiny_config(tie: bool = False) -> "transformers.Qwen3VLConfig":
    """Three decoder layers, grouped-query attention with head_dim 24 (not hidden / heads) and an interleaved
    mrope_section that leaves temporal channels at the end; three vision blocks, DeepStack after two."""
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, max_position_embeddings=512, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 3, 3],
                                 "mrope_interleaved": True},
                tie_word_embeddings=tie, bos_token_id=ENDOFTEXT, eos_token_id=IM_END, pad_token_id=ENDOFTEXT)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, in_channels=3,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[2, 0], hidden_act="gelu_pytorch_tanh")
    return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_PAD,
                                      video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
                                      vision_end_token_id=VISION_END, tie_word_embeddings=tie)


def hf_model(seed: int = 0, tie: bool = False):
    torch.manual_seed(seed)
    return spread_weights(transformers.Qwen3VLForConditionalGeneration(tiny_config(tie)).eval(), seed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen3_vl")
    hf_model().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pair(checkpoint):
    hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(checkpoint).eval()
    ours = from_pretrained(checkpoint)
    assert isinstance(ours, Qwen3VLForConditionalGeneration)
    return hf, ours


def pixels(seed: int, grid) -> np.ndarray:
    return np.random.RandomState(seed).randn(int(np.prod(grid)), PATCH_ROW).astype(np.float32)


def video_prompt(frames: int, hw: tuple[int, int], words: list[int]) -> list[int]:
    """Qwen3-VL's video text: per temporal patch a timestamp (a word here) and its own vision run."""
    tokens = hw[0] * hw[1] // 4
    body = sum(([30 + t, VISION_START] + [VIDEO_PAD] * tokens + [VISION_END] for t in range(frames)), [])
    return [IM_START, 20] + words[:1] + body + words[1:] + [IM_END, IM_START]


def image_prompt(words: list[int]) -> list[int]:
    return [IM_START, 21, VISION_START] + [IMAGE_PAD] * (IMAGE_GRID[1] * IMAGE_GRID[2] // 4) + [VISION_END] + words


def mixed_batch():
    """Row 0: an image, then a 2-patch video; row 1 (left-padded): a 1-patch video of another size."""
    prompts = [image_prompt([22]) + video_prompt(2, VIDEO_GRID, [23, 24]), video_prompt(1, SMALL_GRID, [25])]
    ids, mask = left_pad(prompts)
    grids = np.array([[2, *VIDEO_GRID], [1, *SMALL_GRID]])
    return ids, mask, dict(pixel_values=pixels(1, IMAGE_GRID), image_grid_thw=np.array([IMAGE_GRID]),
                           pixel_values_videos=np.concatenate([pixels(2, grids[0]), pixels(3, grids[1])]),
                           video_grid_thw=grids)


# ----------------------------------------------------------------------------- positions


def test_rope_index_equals_transformers(pair):
    hf, ours = pair
    ids, mask, vision = mixed_batch()
    got, deltas = get_rope_index(ours.config, ids, mask, vision["image_grid_thw"], vision["video_grid_thw"])
    want, want_deltas = hf.model.get_rope_index(torch.tensor(ids), torch.tensor(mm_token_types(ids)),
                                                torch.tensor(vision["image_grid_thw"]),
                                                torch.tensor(vision["video_grid_thw"]), torch.tensor(mask))
    np.testing.assert_array_equal(got[:, mask == 1], want.numpy()[:, mask == 1])
    # transformers 5 counts rope_deltas from the unpadded length, we from the padded one
    np.testing.assert_array_equal(deltas, want_deltas.numpy() - (mask == 0).sum(axis=1, keepdims=True))
    with pytest.raises(ValueError, match="separate runs"):  # a video's patches written as one run
        get_rope_index(ours.config, np.array([[IM_START] + [VIDEO_PAD] * 12]), None, None, np.array([[2, 6, 4]]))


def test_interleaved_rotary_equals_transformers(pair):
    """Interleaved M-RoPE: channel c of the first 3 * section rotates by axis c % 3, the rest by time."""
    hf, ours = pair
    positions = np.random.RandomState(0).randint(0, 50, (3, 2, 7))
    x = torch.zeros(2, 7, 64)
    want_cos, want_sin = hf.model.language_model.rotary_emb(x, torch.tensor(positions))
    table = Tensor(positions.transpose(1, 0, 2).astype(np.int32))
    cos, sin = ours.model.rotary(table)
    np.testing.assert_allclose(cos.asnumpy(), want_cos.numpy(), atol=1e-5)
    np.testing.assert_allclose(sin.asnumpy(), want_sin.numpy(), atol=1e-5)
    block = MultimodalRotary(24, 10000.0, [6, 3, 3])
    assert not np.allclose(block(table)[0].asnumpy(), want_cos.numpy())  # Qwen2-VL's blocks differ


# ----------------------------------------------------------------------------- forward and generation parity


def test_logits_image_and_videos_left_padded(pair):
    hf, ours = pair
    ids, mask, vision = mixed_batch()
    ours.visual.use_jit = False  # PyNative here: the compiled shapes are the ones generation uses
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, mask, **vision)).logits.numpy()
    got = ours(input_ids=ids, attention_mask=mask, **vision).logits.asnumpy()
    # DeepStack matters: given only the embeddings (so without its features) the logits move
    embeds, deepstack = ours.embed_inputs(ids, **vision)
    positions, _ = get_rope_index(ours.config, ids, mask, vision["image_grid_thw"], vision["video_grid_thw"])
    without = ours(input_ids=ids, attention_mask=mask, inputs_embeds=embeds, position_ids=positions).logits.asnumpy()
    ours.visual.use_jit = True
    assert len(deepstack) == 2 and np.abs(deepstack[1].asnumpy()[ids == IM_START]).max() == 0
    assert np.abs(without - ref)[mask == 1].max() > 0.1
    assert np.abs(got - ref)[mask == 1].max() < 1e-4, np.abs(got - ref)[mask == 1].max()


def test_greedy_batch_equals_transformers_one_by_one(pair):
    """Videos of 1, 3 and 2 temporal patches of two sizes, and an image with a video, left-padded into
    one call: each row's ids equal transformers' generate on that prompt alone."""
    hf, ours = pair
    kw = dict(max_new_tokens=NEW_TOKENS, eos_token_id=EOS, pad_token_id=ENDOFTEXT)
    specs = [(1, VIDEO_GRID, [24]), (3, SMALL_GRID, [25, 26, 27]), (2, VIDEO_GRID, [28, 29])]
    prompts = [video_prompt(t, hw, words) for t, hw, words in specs]
    grids = [np.array([[t, *hw]]) for t, hw, _ in specs]
    rows = [pixels(10 + i, g[0]) for i, g in enumerate(grids)]
    prompts.append(image_prompt([26]) + video_prompt(1, SMALL_GRID, [27]))
    grids.append(np.array([[1, *SMALL_GRID]]))
    rows.append(pixels(20, grids[-1][0]))
    image = pixels(21, IMAGE_GRID)
    ids, mask = left_pad(prompts)
    got = ours.generate(ids, mask, pixel_values=image, image_grid_thw=np.array([IMAGE_GRID]),
                        pixel_values_videos=np.concatenate(rows), video_grid_thw=np.concatenate(grids), **kw)
    for row, single in enumerate(prompts):
        single = np.array([single])
        extra = dict(pixel_values=image, image_grid_thw=np.array([IMAGE_GRID])) if row == 3 else {}
        ref = hf_generate(hf, single, np.ones_like(single), pixel_values_videos=rows[row], video_grid_thw=grids[row],
                          **extra, **kw)[0]
        pad = ids.shape[1] - single.shape[1]
        np.testing.assert_array_equal(got[row, pad:pad + len(ref)], ref)
        assert (got[row, pad + len(ref):] == ENDOFTEXT).all()
    assert len({tuple(r) for r in got[:, ids.shape[1]:].tolist()}) > 1, "outputs should depend on the input"


# ----------------------------------------------------------------------------- checkpoints


def test_both_key_layouts_load_and_missing_tensor_fails(checkpoint, tmp_path):
    """transformers 5 saves (and Qwen publishes) the nested layout; the flat one loads the same weights."""
    nested = load_file(str(checkpoint / "model.safetensors"))
    assert any(k.startswith("model.visual.deepstack_merger_list.") for k in nested) and "lm_head.weight" in nested
    flat = {k.replace("model.visual.", "visual.", 1).replace("model.language_model.", "model.", 1): v
            for k, v in nested.items()}
    folder = tmp_path / "flat"
    folder.mkdir()
    shutil.copy(checkpoint / "config.json", folder / "config.json")
    save_file(flat, str(folder / "model.safetensors"), metadata={"format": "pt"})
    new, old = from_pretrained(checkpoint), from_pretrained(folder)
    for (name, a), (_, b) in zip(new.parameters_and_names(), old.parameters_and_names()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=name)

    del nested["model.language_model.layers.1.self_attn.k_norm.weight"]
    save_file(nested, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.1\.self_attn\.k_norm\.weight"):
        from_pretrained(folder)


def test_tied_embeddings(tmp_path):
    """The 2B and 4B tie their embeddings: no lm_head.weight in the checkpoint."""
    hf = hf_model(seed=1, tie=True)
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"]
    ours = from_pretrained(tmp_path)
    assert ours.lm_head is None
    ids, mask = left_pad([video_prompt(1, SMALL_GRID, [20, 21]), [IM_START, 23, IM_END]])
    vision = dict(pixel_values_videos=pixels(5, (1, *SMALL_GRID)), video_grid_thw=np.array([[1, *SMALL_GRID]]))
    ours.visual.use_jit = False
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, mask, **vision)).logits.numpy()
    got = ours(input_ids=ids, attention_mask=mask, **vision).logits.asnumpy()
    assert np.abs(got - ref)[mask == 1].max() < 1e-4


def test_qwen2vl_captioner_refuses_qwen3_vl_in_one_line(checkpoint, tmp_path):
    """The model loads, but captioning it needs Qwen3-VL's own video preprocessing: refused, not mis-captioned."""
    from pipeline.captioning.caption_qwen2vl import main

    table = tmp_path / "meta.csv"
    table.write_text("path\nclip.mp4\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(table), "--pretrained_model_name_or_path", str(checkpoint), "--device", "CPU"])
    message = str(exit_info.value.code)
    assert "'qwen3_vl'" in message and "Qwen3-VL" in message and "\n" not in message
