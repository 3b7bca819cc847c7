"""Qwen3-VL (dense) port: parity with transformers 5 (tiny random fp32) for an image and videos written as
Qwen3-VL writes them (one vision run per temporal patch), DeepStack, interleaved M-RoPE, left-padded
batches, beam search, checkpoint layouts; video preprocessing and timestamps; captioning through
caption_qwen2vl.py."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

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
from models.qwen3_vl.processing import Qwen3VLVisionProcessor  # noqa: E402
from tests.test_qwen2vl import (  # noqa: E402
    ENDOFTEXT, IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, VOCAB, frames,
    hf_generate, hf_inputs, left_pad, mm_token_types, per_frame_video_rows, read_rows, save_tokenizer,
    spread_weights)

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


# The timestamps' characters, so that "<1.5 seconds>" is its own tokens in the tiny word-level tokenizer.
TIME_WORDS = ("<", ">", ".", "seconds", *"0123456789")
QUESTION = "describe the video in detail"
# Videos at most 12 tokens (24 with qwen-vl-utils' temporal factor) in all, so a long one shrinks its frames.
VIDEO_TOKENS = 12


def save_checkpoint(folder: Path, seed: int = 0, model=None) -> Path:
    """The tiny model (or ``model``: the MoE one) with a tokenizer (Qwen's chat template) and Qwen3-VL's
    processor configs, small sizes."""
    (hf_model(seed) if model is None else model).save_pretrained(folder)
    save_tokenizer(folder, TIME_WORDS)
    common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3,
              "image_std": [0.5] * 3}
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {**common, "size": {"shortest_edge": 32 * 32, "longest_edge": 32 * 32 * 8},
         "image_processor_type": "Qwen2VLImageProcessor"}))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(
        {**common, "size": {"shortest_edge": 4096, "longest_edge": 32 * 32 * VIDEO_TOKENS}}))
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": EOS, "pad_token_id": ENDOFTEXT, "bos_token_id": ENDOFTEXT}))
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("qwen3_vl"))


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


def assert_beams_equal_transformers_one_by_one(hf, ours):
    """3 beams over a left-padded batch of two videos: every returned beam equals transformers' beam search on
    that prompt alone. Returns the batch and our beams for further checks."""
    kw = dict(max_new_tokens=NEW_TOKENS, eos_token_id=EOS, pad_token_id=ENDOFTEXT, num_beams=3,
              num_return_sequences=3)
    specs = [(2, VIDEO_GRID, [24, 25]), (1, SMALL_GRID, [26])]
    prompts = [video_prompt(t, hw, words) for t, hw, words in specs]
    grids = [np.array([[t, *hw]]) for t, hw, _ in specs]
    rows = [pixels(30 + i, g[0]) for i, g in enumerate(grids)]
    ids, mask = left_pad(prompts)
    vision = dict(pixel_values_videos=np.concatenate(rows), video_grid_thw=np.concatenate(grids))
    got = ours.generate(ids, mask, **vision, **kw)
    for row, single in enumerate(prompts):
        single = np.array([single])
        ref = hf_generate(hf, single, np.ones_like(single), pixel_values_videos=rows[row], video_grid_thw=grids[row],
                          **kw)
        pad = ids.shape[1] - single.shape[1]
        mine = got[3 * row:3 * row + 3, pad:]
        np.testing.assert_array_equal(mine[:, :ref.shape[1]], ref, err_msg=f"row {row}")
        assert (mine[:, ref.shape[1]:] == ENDOFTEXT).all()
    assert len({tuple(r) for r in got[:, ids.shape[1]:].tolist()}) > 3, "beams should differ"
    return ids, mask, vision, kw, got


def test_beam_search_equals_transformers_one_by_one(pair):
    """The DeepStack features go to the prompt's step only (not into the beams' cache), and they matter: without
    them the beams change."""
    hf, ours = pair
    ids, mask, vision, kw, got = assert_beams_equal_transformers_one_by_one(hf, ours)
    embeds, _ = ours.embed_inputs(ids, **vision)
    with mock.patch.object(ours, "embed_inputs", lambda *args: (embeds, ())):
        without = ours.generate(ids, mask, **vision, **kw)
    assert not np.array_equal(without, got)


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


# ----------------------------------------------------------------------------- preprocessing and timestamps


def transformers_video_module():
    """transformers 5.25's Qwen3-VL video processing module, loaded from its file: transformers hides it
    behind a torchvision check, and torchvision does not install here (PyPI's build for torch 2.13 is a CUDA
    one that does not load with the CPU torch). Its resize rule needs only torch."""
    name = "transformers.models.qwen3_vl.video_processing_qwen3_vl_file"
    if name not in sys.modules:
        path = Path(transformers.__file__).parent / "models/qwen3_vl/video_processing_qwen3_vl.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def transformers_video_size(proc: Qwen3VLVisionProcessor, count: int, height: int, width: int) -> tuple[int, int]:
    """The frame size ``Qwen3VLVideoProcessor.resize`` (5.25's code) picks with the per-frame cap on, for our
    rule's numbers: ``max_video_tokens`` the per-patch top, ``shortest_edge`` the per-patch floor and
    ``longest_edge`` the video's total times the temporal patch. One frame is sized as its padded patch."""
    from transformers.image_utils import SizeDict
    from transformers.video_processing_utils import BaseVideoProcessor

    module = transformers_video_module()
    unit = (proc.patch_size * proc.merge_size) ** 2
    size = SizeDict(shortest_edge=proc.frame_tokens[0] * unit,
                    longest_edge=proc.temporal_patch_size * proc.video_pixels[1])
    chosen = {}
    with mock.patch.object(BaseVideoProcessor, "resize",
                           lambda self, image, size, resample=None: chosen.setdefault("size", size)):
        video = torch.zeros(1).expand(1, max(count, proc.temporal_patch_size), 3, height, width)  # a view, no pixels
        object.__new__(module.Qwen3VLVideoProcessor).resize(
            video, size, None, factor=proc.patch_size * proc.merge_size, temporal_factor=proc.temporal_patch_size,
            cap_pixels_per_frame=True, max_video_tokens=proc.frame_tokens[1])
    return chosen["size"].height, chosen["size"].width


def test_video_size_equals_transformers_capped_rule():
    """Published settings: the size 5.25's capped resize picks, from a few frames to 768 at 1080p. The
    per-patch range binds at both ends, and the total (about 24,576 tokens) in between."""
    proc = Qwen3VLVisionProcessor()
    tokens = {}
    for count, height, width in [(2, 448, 672), (4, 1080, 1920), (7, 480, 640), (60, 448, 672), (201, 720, 1280),
                                 (768, 1080, 1920), (3, 20, 30)]:
        size = proc.video_size(count, height, width)
        assert size == transformers_video_size(proc, count, height, width), (count, height, width)
        t, h, w = proc.video_grid(count, height, width)
        tokens[count, height] = (h * w // 4, t * h * w // 4)
    assert tokens[4, 1080][0] <= 768 and tokens[2, 448][0] == 14 * 21  # 448 x 672 needs no resize
    assert 110 < tokens[768, 1080][0] < 140  # the floor binds: 384 patches of about 128 tokens (sides floored)
    assert 20000 < tokens[201, 720][1] <= 24576  # the total binds


def test_preprocessing_equals_transformers(checkpoint):
    """Each video's grid is 5.25's capped rule's; its rows equal transformers' PIL image processor applied
    frame by frame at that size (see tests.test_qwen2vl.per_frame_video_rows); images as Qwen2-VL's."""
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    ref = transformers.Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
    ours = Qwen3VLVisionProcessor.from_pretrained(checkpoint, frame_tokens=(4, 8))
    assert ours.patch_size == 16 and ours.video_pixels[1] == 32 * 32 * VIDEO_TOKENS
    grids = []
    for count, (h, w) in [(2, (64, 96)), (6, (100, 150)), (5, (70, 50)), (1, (64, 96)), (2, (20, 30))]:
        video = frames(count, count, h, w)
        size = transformers_video_size(ours, count, h, w)
        with mock.patch.object(pil, "smart_resize", lambda *args, **kwargs: size):
            want, want_grid = per_frame_video_rows(ref, video)
        got, grid = ours.video(video)
        np.testing.assert_array_equal(grid, want_grid)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        grids.append(grid[0].tolist())
    assert grids[0] == [1, 4, 6] and grids[1][1:] != [6, 8]  # 6 frames share the total: smaller frames
    images = [frames(7, 1, 64, 96)[0], frames(8, 1, 33, 120)[0]]
    want = ref(images=images, return_tensors="np")
    got, grid = ours.images(images)
    np.testing.assert_array_equal(grid, want["image_grid_thw"])
    np.testing.assert_allclose(got, want["pixel_values"], atol=1e-6, rtol=0)


def transformers_video_text(tokenizer, text: str, grid, indices, fps: float) -> str:
    """The prompt text transformers 5.25's ``Qwen3VLProcessor`` makes of ``text`` and one video: its own
    ``replace_video_token`` (timestamps from the frame indices and fps) and ``get_text_with_replacements``
    (the chat template's vision start/end collapsed). Calling the processor itself needs its video
    processor, hence torchvision; these two methods are the text half of that call."""
    from transformers.video_utils import VideoMetadata

    processor = object.__new__(transformers.Qwen3VLProcessor)
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.vision_start_token, processor.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    processor.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    metadata = VideoMetadata(total_num_frames=int(max(indices)) + 1, fps=fps, frames_indices=np.asarray(indices))
    placeholder = processor.replace_video_token({"video_grid_thw": np.asarray(grid), "video_metadata": [metadata]}, 0)
    return processor.get_text_with_replacements([text], [], [placeholder])[0][0]


@pytest.fixture(scope="module")
def captioner(checkpoint):
    from pipeline.captioning.caption_qwen2vl import Qwen2VLCaptioner

    return Qwen2VLCaptioner(str(checkpoint), question=QUESTION, fps=2, height=64, width=96,
                            max_new_tokens=NEW_TOKENS, max_frame_tokens=6)


def test_prompt_ids_equal_transformers_processor_text(checkpoint, captioner):
    """Our prompt ids for a video equal the tokenizer's ids of the text 5.25's processor writes for the same
    frames (5 frames at indices 0, 3, ..., 12 of a 10 fps video: 3 temporal patches, the last padded), also
    for a chat prompt given later, and the timestamps reach the ids."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    indices = np.arange(0, 15, 3)
    video = captioner.prepare(frames(3, 5, 64, 96), frame_times=indices / 10.0)
    grid = video.inputs.video_grid_thw
    assert grid[0].tolist() == [3, 4, 6]
    want = transformers_video_text(tokenizer, captioner.prompt_text, grid, indices, 10.0)
    assert "<0.1 seconds><|vision_start|>" in want and "<1.2 seconds>" in want and want.count("<|vision_end|>") == 3
    assert video.inputs.input_ids == tokenizer(want)["input_ids"]
    from pipeline.captioning.chat import Turn

    chat = captioner.chat_prompt([Turn("user", "what is shown", media=True), Turn("assistant", "a square"),
                                  Turn("user", "what colour")])
    assert captioner.with_prompt(video, chat).input_ids == tokenizer(
        transformers_video_text(tokenizer, chat, grid, indices, 10.0))["input_ids"]
    later = captioner.prepare(frames(3, 5, 64, 96), frame_times=indices / 10.0 + 2)
    assert later.inputs.input_ids != video.inputs.input_ids


# ----------------------------------------------------------------------------- captioning entry script


# tests.test_qwen2vl.SOURCES with a fixed seed for the cellular automaton (random otherwise): 1, 2, 1.5, 0.5 s.
SOURCES = (("testsrc=decimals=0", 1.0), ("color=c=red", 2.0), ("cellauto=rule=110:random_seed=7", 1.5),
           ("color=c=blue", 0.5))
CLI = ["--height", "64", "--width", "96", "--max_frame_tokens", "6", "--max_new_tokens", "6", "--device", "CPU",
       "--no-cleanup", "--question", QUESTION]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    from tests.video_factory import write_caption_clips

    return write_caption_clips(tmp_path_factory.mktemp("qwen3_videos"), SOURCES, clip_id="c{}")


@pytest.fixture(scope="module")
def expected_captions(pair, checkpoint, clips, captioner) -> dict[str, str]:
    """transformers' greedy generate, one video at a time, on our inputs for the frames the runner samples
    (2 fps, qwen3_vl.yaml's rate): pixel rows, grid and prompt ids, with its ``mm_token_type_ids``."""
    captions = reference_captions(pair[0], captioner, clips)
    assert len(set(captions.values()) - {""}) >= 3, f"captions should depend on the video: {captions}"
    return captions


def reference_captions(hf, captioner, clips: Path) -> dict[str, str]:
    """transformers' greedy captions of the SOURCES clips one at a time, on our inputs for the frames and times
    the runner samples (2 fps, at least 4 frames)."""
    from pipeline.datasets.video import sample_frames

    captions = {}
    for i in range(len(SOURCES)):
        sampled, times = sample_frames(str(clips.parent / f"v{i}.mp4"), num_frames=768, fps=2, min_frames=4,
                                       height=64, width=96, return_times=True)
        inputs = captioner.prepare(sampled, frame_times=times).inputs
        ids = np.array([inputs.input_ids])
        out = hf_generate(hf, ids, np.ones_like(ids), pixel_values_videos=inputs.pixel_values_videos,
                          video_grid_thw=inputs.video_grid_thw, max_new_tokens=6, eos_token_id=EOS,
                          pad_token_id=ENDOFTEXT)
        captions[f"v{i}.mp4"] = captioner.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return captions


def test_caption_csv_batched_equals_transformers_one_by_one(checkpoint, clips, expected_captions, tmp_path):
    """config.json picks Qwen3-VL and its preset (2 fps); a batch of 4 gives transformers' captions."""
    from pipeline.captioning.caption_qwen2vl import main as qwen_main

    out = tmp_path / "captions.csv"
    qwen_main([str(clips), "--pretrained_model_name_or_path", str(checkpoint), "--output", str(out),
               "--bs", "4", *CLI])
    rows = read_rows(out)
    assert [r["clip_id"] for r in rows] == ["c0", "c1", "c2", "c3", "bad"]
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["error"]
    assert {r["path"]: r["text"] for r in rows[:4]} == expected_captions
    assert [int(r["num_frames_used"]) for r in rows[:4]] == [4, 4, 4, 4]  # 2 fps over 1, 2, 1.5, 0.5 s; 4 at least
    assert [int(r["visual_tokens"]) for r in rows[:4]] == [12, 12, 12, 12]  # 6 tokens per temporal patch
    assert all(int(r["visual_token_budget"]) > 12 for r in rows[:4])


def test_captioner_refuses_other_models_in_one_line(tmp_path):
    from pipeline.captioning.caption_qwen2vl import main

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "qwen3_omni_moe"}))
    table = tmp_path / "meta.csv"
    table.write_text("path\nclip.mp4\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(table), "--pretrained_model_name_or_path", str(tmp_path / "model"), "--device", "CPU"])
    message = str(exit_info.value.code)
    assert "'qwen3_omni_moe'" in message and "Qwen3-VL" in message and "\n" not in message
