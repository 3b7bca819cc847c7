"""Qwen2-VL port: parity with transformers (tiny random fp32), preprocessing, loading, batching, captioning."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers  # noqa: E402

from models import from_pretrained  # noqa: E402
from models.checkpoint import CheckpointError  # noqa: E402
from models.qwen2_vl.modeling import get_rope_index  # noqa: E402
from models.qwen2_vl.processing import Qwen2VLVisionProcessor  # noqa: E402
from pipeline import distributed  # noqa: E402

distributed.setup("CPU")  # at collection, before any kernel runs, so in-process captioning can use it

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>", "<unk>"]
ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, UNK = range(len(SPECIALS))
VOCAB = 96
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = "describe the video in detail a red blue green square moves left right what is shown image".split()
PIXELS = {"min_pixels": 28 * 28, "max_pixels": 56 * 84}
NEW_TOKENS = 8


def tiny_config(tie: bool = False) -> "transformers.Qwen2VLConfig":
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512, rms_norm_eps=1e-6,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=tie,
                bos_token_id=ENDOFTEXT, eos_token_id=IM_END, pad_token_id=ENDOFTEXT)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_PAD,
                                      video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
                                      vision_end_token_id=VISION_END, tie_word_embeddings=tie,
                                      eos_token_id=IM_END, pad_token_id=ENDOFTEXT, bos_token_id=ENDOFTEXT)


def spread_weights(model, seed: int):
    """Random weights far from the initialisation, so outputs depend on every input."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if ("norm" in name or "ln_q" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.15 * noise if p.dim() > 1 else 0.1 * noise)
    return model


def hf_model(seed: int = 0, tie: bool = False):
    torch.manual_seed(seed)
    return spread_weights(transformers.Qwen2VLForConditionalGeneration(tiny_config(tie)).eval(), seed)


def save_tokenizer(folder: Path, extra_words: tuple[str, ...] = ()) -> None:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in WORDS + list(extra_words) + [f"w{i}" for i in range(VOCAB)]:
        if len(vocab) < VOCAB:
            vocab.setdefault(word, len(vocab))
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                               pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                               additional_special_tokens=SPECIALS[:7])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)


def save_checkpoint(folder: Path, seed: int = 0, tie: bool = False) -> Path:
    hf_model(seed, tie).save_pretrained(folder)
    save_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {**PIXELS, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
         "image_processor_type": "Qwen2VLImageProcessor"}))
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [IM_END, ENDOFTEXT], "pad_token_id": ENDOFTEXT, "bos_token_id": ENDOFTEXT}))
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("qwen2vl"))


@pytest.fixture(scope="module")
def pair(checkpoint):
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(checkpoint).eval()
    return hf, from_pretrained(checkpoint)


def frames(seed: int, count: int, height: int = 56, width: int = 84) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (count, height, width, 3)).astype(np.uint8)


def prompt(kind: str, tokens: int, words: list[int]) -> list[int]:
    pad = VIDEO_PAD if kind == "video" else IMAGE_PAD
    return [IM_START, 20] + words[:1] + [VISION_START] + [pad] * tokens + [VISION_END] + words[1:] + [IM_END, IM_START]


def mm_token_types(ids: np.ndarray) -> np.ndarray:
    """transformers 5's ``mm_token_type_ids``, as its processor returns them: 1 on image placeholders, 2 on
    video placeholders, 0 elsewhere. Its model finds the vision items (and their M-RoPE positions) from them."""
    return np.select([ids == IMAGE_PAD, ids == VIDEO_PAD], [1, 2], 0)


def hf_inputs(ids, mask, **vision) -> dict:
    out = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
           "mm_token_type_ids": torch.tensor(mm_token_types(np.asarray(ids)))}
    out.update({k: torch.tensor(v) for k, v in vision.items()})
    return out


def per_frame_video_rows(ref, video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers 5's video rows and grid, from its PIL image processor.

    Its video processor needs torchvision, which the test environment does not have (PyPI's torchvision
    for torch 2.13 is a CUDA build that does not load with the CPU torch). The image processor resizes,
    rescales and normalises a frame as the video path did in transformers 4 and repeats it over the
    temporal patch; a video row takes temporal slot k of frame ``temporal_patch_size * t + k`` (the last
    frame repeated to fill the final patch), in the same (C, temporal, patch, patch) row layout.
    """
    tp, p = ref.temporal_patch_size, ref.patch_size
    frames_ = list(video) + [video[-1]] * (-len(video) % tp)
    out = ref(images=frames_, return_tensors="np")
    _, h, w = out["image_grid_thw"][0]
    rows = out["pixel_values"].reshape(len(frames_), h * w, -1, tp, p, p)[:, :, :, 0]  # (frames, h*w, C, p, p)
    rows = rows.reshape(len(frames_) // tp, tp, h * w, -1, p, p).transpose(0, 2, 3, 1, 4, 5)
    return rows.reshape(len(frames_) // tp * h * w, -1), np.array([[len(frames_) // tp, h, w]])


# ----------------------------------------------------------------------------- preprocessing


def test_preprocessing_equals_transformers(checkpoint):
    """Images equal transformers' PIL image processor; video rows equal its frames, laid out in temporal
    patches (see per_frame_video_rows)."""
    ref = transformers.Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
    ours = Qwen2VLVisionProcessor.from_pretrained(checkpoint)
    for count, (h, w) in [(4, (56, 84)), (3, (56, 84)), (5, (50, 90)), (1, (40, 70))]:
        video = frames(count, count, h, w)
        want, want_grid = per_frame_video_rows(ref, video)
        got, grid = ours.video(video)
        np.testing.assert_array_equal(grid, want_grid)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    images = [frames(7, 1, 56, 84)[0], frames(8, 1, 33, 120)[0]]
    want = ref(images=images, return_tensors="np")
    got, grid = ours.images(images)
    np.testing.assert_array_equal(grid, want["image_grid_thw"])
    np.testing.assert_array_equal(got, want["pixel_values"])


# ----------------------------------------------------------------------------- forward parity


def test_text_after_a_long_video_follows_qwens_reference(pair):
    """A video with more temporal patches than merged rows or columns. Up to the video's end the positions
    equal transformers'; the text after it continues from the largest position so far + 1, as Qwen's
    reference (its transformers 4 code, vLLM) does. transformers 5.25 continues it at the video's first
    position + its longer merged side, ignoring time, so that text would share positions with the video's
    later frames. The parity tests keep videos within that side (3 merged columns at 56 x 84)."""
    hf, ours = pair
    grid = np.array([[5, 4, 6]])  # 5 temporal patches of 2 x 3 merged patches
    ids, mask = left_pad([prompt("video", 30, [24, 25, 26]), [IM_START, 27, 28]])
    positions, _ = get_rope_index(ours.config, ids, mask, None, grid)
    want, _ = hf.model.get_rope_index(torch.tensor(ids), torch.tensor(mm_token_types(ids)),
                                      video_grid_thw=torch.tensor(grid), attention_mask=torch.tensor(mask))
    first, end = np.flatnonzero(ids[0] == VIDEO_PAD)[[0, -1]] + [0, 1]
    np.testing.assert_array_equal(positions[:, 0, :end], want.numpy()[:, 0, :end])
    np.testing.assert_array_equal(positions[:, 1][:, mask[1] == 1], want.numpy()[:, 1][:, mask[1] == 1])
    video = positions[:, 0, first:end]
    assert video.max() == positions[0, 0, first] + 4  # the last temporal patch, beyond the 3 merged columns
    after = positions[:, 0, end:]
    np.testing.assert_array_equal(after, np.broadcast_to(video.max() + 1 + np.arange(after.shape[1]), after.shape))


def test_logits_image_and_video(pair):
    hf, ours = pair
    proc = Qwen2VLVisionProcessor.from_pretrained(hf.name_or_path)
    pixels, grid = proc.images([frames(1, 1)[0], frames(2, 1, 28, 56)[0]])
    counts = [proc.num_tokens(g) for g in grid]
    ids = np.array([[IM_START, 20, VISION_START] + [IMAGE_PAD] * counts[0] + [VISION_END, 21, VISION_START]
                    + [IMAGE_PAD] * counts[1] + [VISION_END, 22, 23, IM_END]])
    mask = np.ones_like(ids)
    ours.visual.use_jit = False  # PyNative here: the compiled shapes are the ones generation uses
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, mask, pixel_values=pixels, image_grid_thw=grid)).logits.numpy()
    got = ours(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid).logits.asnumpy()
    image_diff = np.abs(got - ref).max()

    videos = [proc.video(frames(3, 4)), proc.video(frames(4, 3, 28, 56))]
    pixels = np.concatenate([v[0] for v in videos])
    grid = np.concatenate([v[1] for v in videos])
    rows = [prompt("video", proc.num_tokens(g), [24, 25, 26]) for g in grid]
    width = max(map(len, rows))
    ids = np.array([[ENDOFTEXT] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, mask, pixel_values_videos=pixels, video_grid_thw=grid)).logits.numpy()
    got = ours(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, video_grid_thw=grid).logits.asnumpy()
    video_diff = np.abs(got - ref)[mask == 1].max()
    ours.visual.use_jit = True
    assert image_diff < 1e-4 and video_diff < 1e-4, (image_diff, video_diff)


# ----------------------------------------------------------------------------- generation


def hf_generate(hf, ids, mask, **kw) -> np.ndarray:
    """transformers' greedy generate; numpy vision inputs (``pixel_values*``, ``*_grid_thw``) become tensors."""
    vision = {k: torch.tensor(v) for k, v in kw.items() if k.startswith("pixel_values") or k.endswith("grid_thw")}
    options = {k: v for k, v in kw.items() if k not in vision}
    with torch.no_grad():
        return hf.generate(**hf_inputs(ids, mask), **vision, do_sample=False, **options).numpy()


def video_batch(proc, specs) -> tuple[list[np.ndarray], list[np.ndarray], list[list[int]]]:
    """(pixel rows, grid, prompt ids) per video for ``specs`` = [(seed, frame count, words), ...]."""
    pixels, grids, prompts = [], [], []
    for seed, count, words in specs:
        rows, grid = proc.video(frames(seed, count))
        pixels.append(rows)
        grids.append(grid)
        prompts.append(prompt("video", proc.num_tokens(grid[0]), words))
    return pixels, grids, prompts


def left_pad(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, prompts))
    ids = np.array([[ENDOFTEXT] * (width - len(p)) + p for p in prompts])
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_image_batch_greedy_ids_equal_transformers_one_by_one(pair):
    """Images of different sizes with prompts of different lengths, left-padded into one call, give the
    ids transformers' generate gives each alone (prompt ids + new tokens)."""
    hf, ours = pair
    proc = Qwen2VLVisionProcessor.from_pretrained(hf.name_or_path)
    kw = dict(max_new_tokens=NEW_TOKENS, eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=ENDOFTEXT)
    images = [frames(6, 1)[0], frames(7, 1, 28, 56)[0], frames(8, 1)[0]]
    pixels, grids = proc.images(images)
    prompts = [prompt("image", proc.num_tokens(g), words) for g, words in
               zip(grids, [[30, 31, 32], [33], [34, 35, 36, 37, 38, 39]])]
    ids, mask = left_pad(prompts)
    got = ours.generate(ids, mask, pixel_values=pixels, image_grid_thw=grids, **kw)
    offsets = np.cumsum([0] + [int(np.prod(g)) for g in grids])
    for row, single in enumerate(prompts):
        single = np.array([single])
        ref = hf_generate(hf, single, np.ones_like(single), pixel_values=pixels[offsets[row]:offsets[row + 1]],
                          image_grid_thw=grids[row:row + 1], **kw)[0]
        pad = ids.shape[1] - single.shape[1]
        np.testing.assert_array_equal(got[row, pad:pad + len(ref)], ref)
        assert (got[row, pad + len(ref):] == ENDOFTEXT).all()


def test_batched_greedy_equals_one_by_one(pair):
    """Videos of different lengths (so real left padding), one batched call == each video alone in transformers."""
    hf, ours = pair
    proc = Qwen2VLVisionProcessor.from_pretrained(hf.name_or_path)
    pixels, grids, prompts = video_batch(proc, [(9, 2, [24]), (10, 6, [25, 26, 27, 28]), (11, 4, [29, 30])])
    singles = []
    for p, g, ids in zip(pixels, grids, prompts):
        ids = np.array([ids])
        singles.append(hf_generate(hf, ids, np.ones_like(ids), pixel_values_videos=p, video_grid_thw=g,
                                   max_new_tokens=NEW_TOKENS, eos_token_id=IM_END)[0, ids.shape[1]:])
    eos = int(singles[0][3])  # a token row 0 produces early: rows then finish at different steps
    kw = dict(max_new_tokens=NEW_TOKENS, eos_token_id=[eos, IM_END], pad_token_id=ENDOFTEXT)
    ids, mask = left_pad(prompts)
    batched = ours.generate(ids, mask, pixel_values_videos=np.concatenate(pixels),
                            video_grid_thw=np.concatenate(grids), **kw)[:, ids.shape[1]:]
    assert (batched[0, 4:] == ENDOFTEXT).all(), "row 0 should stop at its EOS and be padded"
    for row, single in enumerate(singles):
        stops = np.flatnonzero(np.isin(single, kw["eos_token_id"]))
        single = single[:stops[0] + 1] if len(stops) else single  # greedy with an EOS = the same, cut there
        np.testing.assert_array_equal(batched[row, :len(single)], single)
        assert (batched[row, len(single):] == ENDOFTEXT).all()


# ----------------------------------------------------------------------------- checkpoint layouts


def test_both_key_layouts_load_and_missing_tensor_fails(checkpoint, tmp_path):
    """transformers (4.56 and 5.25) saves the published layout (it reverts its conversion mapping on save),
    as the fixture's checkpoint shows; its in-memory layout (``model.visual.*``, ``model.language_model.*``)
    is what other writers produce."""
    published = load_file(str(checkpoint / "model.safetensors"))
    assert any(k.startswith("visual.") for k in published) and any(k.startswith("model.layers.") for k in published)
    nested = {("model." + k if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1)): v
              for k, v in published.items()}
    assert any(k.startswith("model.visual.") for k in nested) and "lm_head.weight" in nested
    folder = tmp_path / "nested"
    folder.mkdir()
    shutil.copy(checkpoint / "config.json", folder / "config.json")
    save_file(nested, str(folder / "model.safetensors"), metadata={"format": "pt"})
    new, old = from_pretrained(checkpoint), from_pretrained(folder)
    for (name, a), (_, b) in zip(new.parameters_and_names(), old.parameters_and_names()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=name)

    del nested["model.language_model.layers.1.mlp.up_proj.weight"]
    save_file(nested, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(folder)


def test_tied_embeddings_text_only(tmp_path):
    """Qwen2-VL-2B ties lm_head to the embedding; text-only prompts use plain 1-D positions."""
    hf = hf_model(seed=1, tie=True)
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    ours = from_pretrained(tmp_path)
    ids, mask = left_pad([[IM_START, 20, 21, 22, IM_END], [IM_START, 23, IM_END]])
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, mask)).logits.numpy()
    got = ours(input_ids=ids, attention_mask=mask).logits.asnumpy()
    assert np.abs(got - ref)[mask == 1].max() < 1e-4


# ----------------------------------------------------------------------------- captioning entry script

SOURCES = (("testsrc=decimals=0", 1.0), ("color=c=red", 2.0), ("cellauto=rule=110", 1.5), ("color=c=blue", 0.5))
# Raw model text, for parity. At 2 fps the longest clip (2 s) is 2 temporal patches, within the 3 merged
# columns of a 56 x 84 frame (see test_text_after_a_long_video_follows_qwens_reference).
CLI = ["--height", "56", "--width", "84", "--fps", "2", "--max_new_tokens", "6", "--device", "CPU",
       "--no-cleanup", "--question", "describe the video in detail"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Clips of different durations (so different frame and token counts) and a broken file."""
    from tests.video_factory import write_caption_clips

    return write_caption_clips(tmp_path_factory.mktemp("qwen_videos"), SOURCES, clip_id="c{}")


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def hf_caption(hf, tokenizer, proc, video: Path) -> str:
    """transformers alone, one video: its chat template, the processor's placeholder expansion, generate."""
    from pipeline.datasets.video import sample_frames

    frames_, _ = sample_frames(str(video), num_frames=768, fps=2, height=56, width=84)
    rows, grid = proc.video(frames_)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": CLI[-1]}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = text.replace("<|video_pad|>", "<|video_pad|>" * proc.num_tokens(grid[0]))
    ids = np.array([tokenizer(text)["input_ids"]])
    out = hf_generate(hf, ids, np.ones_like(ids), pixel_values_videos=rows, video_grid_thw=grid,
                      max_new_tokens=6, eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=ENDOFTEXT)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def expected_captions(pair, checkpoint, videos) -> dict[str, str]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    proc = Qwen2VLVisionProcessor.from_pretrained(checkpoint)
    captions = {f"v{i}.mp4": hf_caption(pair[0], tokenizer, proc, videos.parent / f"v{i}.mp4")
                for i in range(len(SOURCES))}
    assert len(set(captions.values()) - {""}) >= 3, f"captions should depend on the video: {captions}"
    return captions


def test_caption_csv_batched_equals_transformers_one_by_one(checkpoint, videos, expected_captions, tmp_path):
    from pipeline.captioning.caption_qwen2vl import main as qwen_main

    out = tmp_path / "captions.csv"
    qwen_main([str(videos), "--pretrained_model_name_or_path", str(checkpoint), "--output", str(out),
               "--bs", "4", *CLI])
    rows = read_rows(out)
    assert [r["clip_id"] for r in rows] == ["c0", "c1", "c2", "c3", "bad"]
    assert rows[-1]["status"] == "error" and "broken.mp4" in rows[-1]["error"]
    assert all(r["status"] == "ok" for r in rows[:4])
    assert {r["path"]: r["text"] for r in rows[:4]} == expected_captions


def test_caption_qwen2vl_under_msrun(checkpoint, videos, expected_captions, tmp_path):
    from tests.msrun import run_msrun

    out = tmp_path / "captions.csv"
    result = run_msrun(ROOT / "pipeline/captioning/caption_qwen2vl.py",
                       [str(videos), "--pretrained_model_name_or_path", str(checkpoint), "--output", str(out),
                        "--bs", "2", *CLI], cwd=tmp_path)
    assert result.returncode == 0, result.problems
    rows = read_rows(out)
    assert [r["clip_id"] for r in rows] == ["c0", "c1", "c2", "c3", "bad"]
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["error"]
    assert {r["path"]: r["text"] for r in rows[:4]} == expected_captions
    assert "rank 1 of 2" in result.logs


def test_visual_token_budget_keeps_fewer_frames_then_lowers_resolution(checkpoint):
    """At 56x84 a temporal patch is 6 tokens: 40 frames need 120; a budget of 60 keeps 20 frames, a
    budget of 6 keeps MIN_FRAMES (4) at a lower resolution; every prompt stays inside the context."""
    from pipeline.captioning.budget import BudgetError
    from pipeline.captioning.caption_qwen2vl import MIN_FRAMES, Qwen2VLCaptioner

    video = np.stack([np.full((56, 84, 3), i * 6, np.uint8) for i in range(40)])
    roomy = Qwen2VLCaptioner(str(checkpoint), max_new_tokens=8)
    assert roomy.budget == 512 - len(roomy.prefix) - len(roomy.suffix) - 8  # the context, under the cap
    full = roomy.prepare(video)
    assert (full.num_frames_used, full.visual_tokens) == (40, 120)
    tight = Qwen2VLCaptioner(str(checkpoint), max_new_tokens=8, max_visual_tokens=60)
    fewer = tight.prepare(video)
    assert (fewer.num_frames_used, fewer.visual_tokens, fewer.budget) == (20, 60, 60)
    kept = fewer.frames[:, 0, 0, 0] // 6
    assert list(kept) == sorted(set(kept)) and kept[0] < 4 and kept[-1] > 35  # spread over the whole video
    grid, ids = fewer.inputs.video_grid_thw, fewer.inputs.input_ids
    assert len(ids) <= 512 - 8 and int(np.prod(grid[0])) // 4 == 60 and fewer.inputs.second_per_grid_t is None
    smaller = tight.shrink(fewer)
    assert (smaller.budget, smaller.visual_tokens) == (30, 30) and smaller.num_frames_used == 10
    lowres = tight.prepare(video, budget=3)
    assert lowres.num_frames_used == MIN_FRAMES and lowres.visual_tokens <= 3
    assert lowres.inputs[1][0, 1] * lowres.inputs[1][0, 2] < 4 * 6  # fewer patches per frame than 56x84
    with pytest.raises(BudgetError, match="max_visual_tokens"):
        tight.prepare(video, budget=1)
    too_big = Qwen2VLCaptioner(str(checkpoint), max_new_tokens=8, max_visual_tokens=10 ** 6)
    assert too_big.budget == roomy.budget  # never past the context


def test_caption_columns_record_the_budget(checkpoint, videos, tmp_path):
    from pipeline.captioning.caption_qwen2vl import main as qwen_main

    out = tmp_path / "captions.csv"
    qwen_main([str(videos), "--pretrained_model_name_or_path", str(checkpoint), "--output", str(out),
               "--bs", "4", "--max_visual_tokens", "12", *CLI, "--fps", "4"])  # 4 fps: the 2 s clip needs 24
    rows = [r for r in read_rows(out) if r["status"] == "ok"]
    assert len(rows) == 4
    for row in rows:
        assert int(row["visual_tokens"]) <= 12 and row["visual_token_budget"] == "12"
        assert int(row["num_frames_used"]) >= 1
