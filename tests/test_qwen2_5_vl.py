"""Qwen2.5-VL port: parity with transformers (tiny random fp32), window layout, time positions, checkpoint
layouts, captioning through caption_qwen2vl.py (in process and under msrun)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from models import from_pretrained  # noqa: E402
from models.checkpoint import CheckpointError  # noqa: E402
from models.qwen2_5_vl.modeling import Qwen2_5_VLForConditionalGeneration  # noqa: E402
from models.qwen2_5_vl.processing import Qwen2_5_VLVisionProcessor, sampled_fps  # noqa: E402
from models.qwen2_5_vl.vision import window_layout  # noqa: E402
from models.qwen2_vl.modeling import get_rope_index  # noqa: E402
from tests.test_qwen2vl import (  # noqa: E402
    CLI, ENDOFTEXT, IM_END, IM_START, IMAGE_PAD, SOURCES, VIDEO_PAD, VISION_END, VISION_START, VOCAB, frames,
    hf_generate, hf_inputs, left_pad, mm_token_types, per_frame_video_rows, prompt, read_rows, save_tokenizer,
    spread_weights)

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 8
# A 168 x 140 image is 12 x 10 patches, 6 x 5 merged: 112 px windows (4 x 4 merged) leave 2-row and
# 1-column windows at the edges. Video frames of 112 x 196 are 4 x 7 merged: full-height windows, one
# 3 wide.
IMAGE_SIZE, VIDEO_SIZE = (168, 140), (112, 196)
PIXELS = {"min_pixels": 28 * 28, "max_pixels": 168 * 196}
EOS = [IM_END, ENDOFTEXT]
# Qwen2.5-VL's fps 2 (its processor default): 2-frame temporal patches of one second each.
CAPTION_CLI = ["--height", str(VIDEO_SIZE[0]), "--width", str(VIDEO_SIZE[1]), "--fps", "2", *CLI[6:]]


def tiny_config(tie: bool = False) -> "transformers.Qwen2_5_VLConfig":
    """Two decoder layers with grouped-query attention (4 heads, 2 KV heads); four vision blocks, the
    second and fourth with full attention; published window size and tokens per second."""
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512, rms_norm_eps=1e-6,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=tie,
                bos_token_id=ENDOFTEXT, eos_token_id=IM_END, pad_token_id=ENDOFTEXT)
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, in_channels=3,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[1, 3], tokens_per_second=2, hidden_act="silu")
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_PAD,
                                         video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
                                         vision_end_token_id=VISION_END, tie_word_embeddings=tie,
                                         eos_token_id=IM_END, pad_token_id=ENDOFTEXT, bos_token_id=ENDOFTEXT)


def hf_model(seed: int = 0, tie: bool = False):
    torch.manual_seed(seed)
    return spread_weights(transformers.Qwen2_5_VLForConditionalGeneration(tiny_config(tie)).eval(), seed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen2_5_vl")
    hf_model().save_pretrained(folder)
    save_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {**PIXELS, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
         "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}))
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": EOS, "pad_token_id": ENDOFTEXT, "bos_token_id": ENDOFTEXT}))
    return folder


@pytest.fixture(scope="module")
def pair(checkpoint):
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).eval()
    ours = from_pretrained(checkpoint)
    assert isinstance(ours, Qwen2_5_VLForConditionalGeneration)
    return hf, ours


@pytest.fixture(scope="module")
def proc(checkpoint) -> Qwen2_5_VLVisionProcessor:
    return Qwen2_5_VLVisionProcessor.from_pretrained(checkpoint)


def videos(proc, specs) -> tuple[list[np.ndarray], list[np.ndarray], list[list[int]]]:
    """(pixel rows, grid, prompt ids) per video for ``specs`` = [(seed, frame count, words), ...]."""
    pixels, grids, prompts = [], [], []
    for seed, count, words in specs:
        rows, grid = proc.video(frames(seed, count, *VIDEO_SIZE))
        pixels.append(rows)
        grids.append(grid)
        prompts.append(prompt("video", proc.num_tokens(grid[0]), words))
    return pixels, grids, prompts


# ----------------------------------------------------------------------------- windows and positions


def test_window_order_equals_transformers_window_index(pair):
    """Our per-slice layout, laid end to end, is transformers' window index and window lengths (a function of
    transformers.vision_utils in transformers 5, a method of the vision model in 4)."""
    from transformers.vision_utils import get_vision_window_index

    vision = pair[0].config.vision_config
    grids = np.array([[1, 12, 10], [3, 8, 14], [2, 16, 16], [1, 4, 6]])
    index, cu_seqlens = get_vision_window_index(torch.tensor(grids), vision.spatial_merge_size, vision.window_size,
                                                vision.patch_size)
    want_lengths = np.diff(np.unique(np.array(cu_seqlens)))
    order, lengths, offset = [], [], 0
    for t, h, w in grids:
        layout = window_layout(h, w, 2, 4)
        keep = layout.key_mask if layout.key_mask is not None else np.ones((len(layout.gather) // 64, 64), bool)
        assert (layout.order[layout.restore.repeat(4) * 4 + np.tile(np.arange(4), h * w // 4)]
                == np.arange(h * w)).all()  # restore undoes order
        for _ in range(t):
            order.append(layout.order[::4] // 4 + offset)
            lengths += keep.sum(axis=1).tolist()
            offset += h * w // 4
    np.testing.assert_array_equal(np.concatenate(order), index.numpy())
    np.testing.assert_array_equal(lengths, want_lengths)
    assert window_layout(16, 16, 2, 4).key_mask is None  # 8 x 8 merged: four full windows, no mask


def test_rope_index_time_positions(pair, proc):
    """Left-padded image + video prompts: positions equal transformers' for whole and fractional seconds
    per temporal patch, Qwen's reference floor(t * seconds * tokens_per_second) (transformers 4.56 cut the
    seconds to an integer first; 5.25 does not). Where a video's times reach past its longer merged side,
    the text after it continues from the largest position + 1, as in Qwen's reference; transformers 5.25
    continues it at the video's first position + that side (see test_qwen2vl's long-video test)."""
    hf, ours = pair
    pixels, grids, prompts = videos(proc, [(1, 6, [24]), (2, 4, [25, 26, 27])])
    image_rows, image_grid = proc.images([frames(3, 1, *IMAGE_SIZE)[0]])
    prompts[1] = prompt("image", proc.num_tokens(image_grid[0]), [28]) + prompts[1]
    ids, mask = left_pad(prompts)
    grid = np.concatenate(grids)  # 3 and 2 temporal patches of 4 x 7 merged patches
    for seconds in ([1.0, 2.0], [0.75, 1.5]):  # times within the 7 merged columns
        got = get_rope_index(ours.config, ids, mask, image_grid, grid, np.array(seconds))
        want = hf.model.get_rope_index(torch.tensor(ids), torch.tensor(mm_token_types(ids)), torch.tensor(image_grid),
                                       torch.tensor(grid), torch.tensor(seconds), torch.tensor(mask))
        # padding slots carry no meaning (we give them 1, transformers 5 gives 0); its rope_deltas count
        # from the unpadded length, ours from the padded one
        np.testing.assert_array_equal(got[0][:, mask == 1], want[0].numpy()[:, mask == 1])
        np.testing.assert_array_equal(got[1], want[1].numpy() - (mask == 0).sum(axis=1, keepdims=True))
    positions, _ = get_rope_index(ours.config, ids[:1], mask[:1], None, grid[:1], np.array([0.75]))
    start = int(np.flatnonzero(ids[0] == VIDEO_PAD)[0])
    temporal = positions[0, 0, start:start + proc.num_tokens(grid[0])].reshape(3, -1)  # 3 temporal patches
    assert (temporal == temporal[:, :1]).all()
    np.testing.assert_array_equal(temporal[:, 0] - temporal[0, 0], [0, 1, 3])  # floor(t * 0.75 * 2)
    positions, _ = get_rope_index(ours.config, ids[:1], mask[:1], None, grid[:1], np.array([2.0]))
    end = start + proc.num_tokens(grid[0])
    assert positions[0, 0, end - 1] == positions[0, 0, start] + 8  # time 2 * 2.0 * 2, past the 7 columns
    after = positions[:, 0, end:]
    np.testing.assert_array_equal(after, np.broadcast_to(positions[0, 0, start] + 9 + np.arange(after.shape[1]),
                                                         after.shape))


def test_second_per_grid_from_frame_rate(proc):
    assert sampled_fps(np.array([0.125, 0.375, 0.625, 0.875])) == 4.0 and sampled_fps(np.array([0.5])) is None
    assert proc.second_per_grid(4.0) == 0.5 and proc.second_per_grid(None) == 1.0  # Qwen2.5-VL's 2 fps default


# ----------------------------------------------------------------------------- forward and generation parity


def test_logits_image_and_video(pair, proc):
    hf, ours = pair
    pixels, grid = proc.images([frames(4, 1, *IMAGE_SIZE)[0], frames(5, 1, *VIDEO_SIZE)[0]])
    counts = [proc.num_tokens(g) for g in grid]
    ids = np.array([[IM_START, 20, VISION_START] + [IMAGE_PAD] * counts[0] + [VISION_END, 21, VISION_START]
                    + [IMAGE_PAD] * counts[1] + [VISION_END, 22, 23, IM_END]])
    mask = np.ones_like(ids)
    ours.visual.use_jit = False  # PyNative here: the compiled shapes are the ones generation uses
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, mask, pixel_values=pixels, image_grid_thw=grid)).logits.numpy()
    got = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid).logits.asnumpy()
    image_diff = np.abs(got - ref).max()

    pixels, grids, prompts = videos(proc, [(6, 6, [24, 25, 26]), (7, 4, [27])])
    ids, mask = left_pad(prompts)
    video = dict(pixel_values_videos=np.concatenate(pixels), video_grid_thw=np.concatenate(grids),
                 second_per_grid_ts=np.array([1.0, 2.0], np.float32))
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, mask, **video)).logits.numpy()
    got = ours(input_ids=ids, attention_mask=mask, **video).logits.asnumpy()
    video_diff = np.abs(got - ref)[mask == 1].max()
    ours.visual.use_jit = True
    assert image_diff < 1e-4 and video_diff < 1e-4, (image_diff, video_diff)


def test_greedy_batch_equals_transformers_one_by_one(pair, proc):
    """Videos of 1, 3 and 2 temporal patches (so real left padding) at different time scales, and two
    images of different sizes: one left-padded call each == transformers' generate on each alone."""
    hf, ours = pair
    kw = dict(max_new_tokens=NEW_TOKENS, eos_token_id=EOS, pad_token_id=ENDOFTEXT)
    pixels, grids, prompts = videos(proc, [(9, 2, [24]), (10, 6, [25, 26, 27, 28]), (11, 4, [29, 30])])
    seconds = np.array([1.0, 0.5, 1.5], np.float32)  # times within the 7 merged columns (test_rope_index_...)
    ids, mask = left_pad(prompts)
    got = ours.generate(ids, mask, pixel_values_videos=np.concatenate(pixels), video_grid_thw=np.concatenate(grids),
                        second_per_grid_ts=seconds, **kw)
    for row, (p, g, single) in enumerate(zip(pixels, grids, prompts)):
        single = np.array([single])
        ref = hf_generate(hf, single, np.ones_like(single), pixel_values_videos=p, video_grid_thw=g,
                          second_per_grid_ts=torch.tensor(seconds[row:row + 1]), **kw)[0]
        pad = ids.shape[1] - single.shape[1]
        np.testing.assert_array_equal(got[row, pad:pad + len(ref)], ref)
        assert (got[row, pad + len(ref):] == ENDOFTEXT).all()

    pixels, grids = proc.images([frames(12, 1, *IMAGE_SIZE)[0], frames(13, 1, *VIDEO_SIZE)[0]])
    prompts = [prompt("image", proc.num_tokens(g), words) for g, words in zip(grids, [[31, 32, 33], [34]])]
    ids, mask = left_pad(prompts)
    got = ours.generate(ids, mask, pixel_values=pixels, image_grid_thw=grids, **kw)
    offsets = np.cumsum([0] + [int(np.prod(g)) for g in grids])
    for row, single in enumerate(prompts):
        single = np.array([single])
        ref = hf_generate(hf, single, np.ones_like(single), pixel_values=pixels[offsets[row]:offsets[row + 1]],
                          image_grid_thw=grids[row:row + 1], **kw)[0]
        pad = ids.shape[1] - single.shape[1]
        np.testing.assert_array_equal(got[row, pad:pad + len(ref)], ref)


# ----------------------------------------------------------------------------- preprocessing and checkpoints


def test_preprocessing_equals_transformers(tmp_path):
    """The published Qwen2.5-VL preprocessor_config.json: transformers' PIL image processor gives the same
    image rows, and the same video rows frame by frame (see test_qwen2vl.per_frame_video_rows)."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
         "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
         "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}))
    ref = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    ours = Qwen2_5_VLVisionProcessor.from_pretrained(tmp_path)
    for count, (h, w) in [(4, (56, 84)), (3, (50, 90))]:
        video = frames(count, count, h, w)
        want, want_grid = per_frame_video_rows(ref, video)
        got, grid = ours.video(video)
        np.testing.assert_array_equal(grid, want_grid)
        np.testing.assert_array_equal(got, want)
    image = frames(9, 1, 33, 120)[0]
    got, grid = ours.images([image])
    np.testing.assert_array_equal(got, ref(images=[image], return_tensors="np")["pixel_values"])


def test_both_key_layouts_load_and_missing_tensor_fails(checkpoint, tmp_path):
    published = load_file(str(checkpoint / "model.safetensors"))
    assert any(k.startswith("visual.") for k in published) and "lm_head.weight" in published
    nested = {("model." + k if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1)): v
              for k, v in published.items()}
    folder = tmp_path / "nested"
    folder.mkdir()
    shutil.copy(checkpoint / "config.json", folder / "config.json")
    save_file(nested, str(folder / "model.safetensors"), metadata={"format": "pt"})
    new, old = from_pretrained(checkpoint), from_pretrained(folder)
    for (name, a), (_, b) in zip(new.parameters_and_names(), old.parameters_and_names()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=name)

    del nested["model.visual.blocks.2.mlp.gate_proj.bias"]
    save_file(nested, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing: visual\.blocks\.2\.mlp\.gate_proj\.bias"):
        from_pretrained(folder)


def test_tied_embeddings_published_3b_config(tmp_path, proc):
    """Qwen2.5-VL-3B's layout: a flat config.json (LM keys at the top, tie_word_embeddings, rope_theta and
    rope_scaling {"type": "mrope", ...} as transformers 4 wrote them) and no lm_head. transformers 5 reads
    the rope keys into text_config.rope_parameters and tie_word_embeddings onto the outer config only."""
    hf = hf_model(seed=1, tie=True)
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    nested = json.loads((tmp_path / "config.json").read_text())
    text = nested.pop("text_config")
    rope = text.pop("rope_parameters")
    nested["vision_config"].pop("rope_parameters")
    flat = {**text, **nested, "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    flat.update(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"])
    (tmp_path / "config.json").write_text(json.dumps(flat))
    ours = from_pretrained(tmp_path)
    assert ours.lm_head is None
    rows, grid = proc.video(frames(14, 4, *VIDEO_SIZE))
    ids, mask = left_pad([prompt("video", proc.num_tokens(grid[0]), [20, 21]), [IM_START, 23, IM_END]])
    ours.visual.use_jit = False
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, mask, pixel_values_videos=rows, video_grid_thw=grid)).logits.numpy()
    got = ours(input_ids=ids, attention_mask=mask, pixel_values_videos=rows, video_grid_thw=grid).logits.asnumpy()
    assert np.abs(got - ref)[mask == 1].max() < 1e-4


# ----------------------------------------------------------------------------- captioning entry script


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    from tests.video_factory import write_caption_clips

    return write_caption_clips(tmp_path_factory.mktemp("qwen25_videos"), SOURCES, clip_id="c{}")


def hf_caption(hf, tokenizer, proc, video: Path) -> str:
    """transformers alone, one video: the chat template, placeholder expansion, second_per_grid_ts from the
    sampled frames' times (the clips run at 10 fps), generate."""
    from pipeline.datasets.video import sample_frames

    sampled, indices = sample_frames(str(video), num_frames=768, fps=2, height=VIDEO_SIZE[0], width=VIDEO_SIZE[1])
    rows, grid = proc.video(sampled)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": CLI[-1]}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = text.replace("<|video_pad|>", "<|video_pad|>" * proc.num_tokens(grid[0]))
    ids = np.array([tokenizer(text)["input_ids"]])
    seconds = np.array([proc.second_per_grid(sampled_fps(indices / 10.0))], np.float32)
    out = hf_generate(hf, ids, np.ones_like(ids), pixel_values_videos=rows, video_grid_thw=grid,
                      second_per_grid_ts=torch.tensor(seconds), max_new_tokens=6, eos_token_id=EOS,
                      pad_token_id=ENDOFTEXT)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def expected_captions(pair, checkpoint, clips, proc) -> dict[str, str]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    captions = {f"v{i}.mp4": hf_caption(pair[0], tokenizer, proc, clips.parent / f"v{i}.mp4")
                for i in range(len(SOURCES))}
    assert len(set(captions.values()) - {""}) >= 3, f"captions should depend on the video: {captions}"
    return captions


def test_caption_csv_batched_equals_transformers_one_by_one(checkpoint, clips, expected_captions, tmp_path):
    from pipeline.captioning.caption_qwen2vl import main as qwen_main

    out = tmp_path / "captions.csv"
    qwen_main([str(clips), "--pretrained_model_name_or_path", str(checkpoint), "--output", str(out),
               "--bs", "4", *CAPTION_CLI])
    rows = read_rows(out)
    assert [r["clip_id"] for r in rows] == ["c0", "c1", "c2", "c3", "bad"]
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["error"]
    assert {r["path"]: r["text"] for r in rows[:4]} == expected_captions
    assert [int(r["num_frames_used"]) for r in rows[:4]] == [2, 4, 3, 1]  # 2 fps over 1, 2, 1.5 and 0.5 s


def test_caption_under_msrun(checkpoint, clips, expected_captions, tmp_path):
    from tests.msrun import run_msrun

    out = tmp_path / "captions.csv"
    result = run_msrun(ROOT / "pipeline/captioning/caption_qwen2vl.py",
                       [str(clips), "--pretrained_model_name_or_path", str(checkpoint), "--output", str(out),
                        "--bs", "2", *CAPTION_CLI], cwd=tmp_path)
    assert result.returncode == 0, result.problems
    rows = read_rows(out)
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["error"]
    assert {r["path"]: r["text"] for r in rows[:4]} == expected_captions
    assert "rank 1 of 2" in result.logs


def test_captioner_time_scale_follows_sampled_frames(checkpoint):
    """second_per_grid_ts comes from the frames' times, follows the budget's frame dropping, and without
    times is the rate the frame spec samples at (Qwen2.5-VL's 2 fps with --num_frames)."""
    from pipeline.captioning.caption_qwen2vl import Qwen2VLCaptioner

    video = np.stack([np.full((*VIDEO_SIZE, 3), i * 6, np.uint8) for i in range(16)])
    times = np.arange(16) / 4.0 + 0.125  # sampled at 4 fps
    roomy = Qwen2VLCaptioner(str(checkpoint), max_new_tokens=8, fps=4, height=VIDEO_SIZE[0], width=VIDEO_SIZE[1])
    assert roomy.prepare(video, frame_times=times).inputs.second_per_grid_t == 0.5
    assert roomy.prepare(video).inputs.second_per_grid_t == 0.5  # --fps 4 without times
    halved = roomy.prepare(video, budget=4 * 28, frame_times=times)  # 4 of 8 temporal patches fit: every other frame
    assert halved.num_frames_used == 8 and halved.inputs.second_per_grid_t == 1.0
    assert roomy.shrink(halved).inputs.second_per_grid_t == 2.0  # MIN_FRAMES (4) over the same 4 s
    counted = Qwen2VLCaptioner(str(checkpoint), max_new_tokens=8, num_frames=16)
    assert counted.prepare(video).inputs.second_per_grid_t == 1.0
