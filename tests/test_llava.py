"""LLaVA-1.5 and LLaVA-NeXT: parity with transformers (tiny random fp32 models), preprocessing, loading,
batching, and caption_llava.py end to end (in process and under msrun)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from models import from_pretrained
from models.checkpoint import CheckpointError, load_checkpoint
from models.llama import LlamaForCausalLM
from models.llava import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from models.llava.processing import ClipFrameProcessor, LlavaNextFrameProcessor
from pipeline.captioning.caption_llava import main as llava_main
from pipeline.datasets.video import sample_frames
from tests.llava_fixtures import IMAGE_TOKEN, TRANSFORMERS4, left_pad, make_videos, rename_keys, save_checkpoint
from pipeline import distributed
from tests.msrun import run_msrun
from tests.tiny_models import _randomize

distributed.setup("CPU")  # at collection, before any kernel runs, so in-process captioning can use it

ROOT = Path(__file__).resolve().parents[1]
GEN = ["--max_new_tokens", "6", "--device", "CPU", "--no-cleanup"]  # raw model text


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(transformers model, our model from the save_pretrained layout, folder)."""
    folder = tmp_path_factory.mktemp("llava")
    hf = save_checkpoint(folder, "llava")
    return hf, from_pretrained(folder), folder


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return make_videos(tmp_path_factory.mktemp("videos"))


def prompts_with_images(count: int, images: list[int]) -> list[list[int]]:
    """Prompts of different lengths, each with images[row] images of ``count`` tokens."""
    rng = np.random.default_rng(0)
    rows = []
    for row, n in enumerate(images):
        text = [int(t) for t in rng.integers(5, 90, 2 + 2 * row)]
        rows.append(text[:1] + [IMAGE_TOKEN] * (count * n) + text[1:])
    return rows


def assert_same_as_alone(alone: np.ndarray, batched_row: np.ndarray, pad: int = 0) -> None:
    """A row generated alone equals its batched row (which may go on with padding after its EOS)."""
    np.testing.assert_array_equal(alone, batched_row[:len(alone)])
    assert (batched_row[len(alone):] == pad).all()


def hf_greedy(hf, **inputs) -> np.ndarray:
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        return hf.generate(**tensors, max_new_tokens=8, do_sample=False).numpy()


def test_llava15_logits_and_greedy_equal_transformers(llava):
    hf, ours, _ = llava
    assert type(ours) is LlavaForConditionalGeneration
    count = ours.image_token_count()
    pixels = np.random.default_rng(1).normal(size=(3, 3, 56, 56)).astype(np.float32)
    ids, mask = left_pad(prompts_with_images(count, [1, 1, 1]))
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 pixel_values=torch.from_numpy(pixels)).logits.numpy()
    got = ours(pixels, ids, attention_mask=mask).logits.asnumpy()
    valid = mask.astype(bool)
    assert np.abs(ref - got)[valid].max() < 1e-4

    batched = ours.generate(pixels, ids, attention_mask=mask, max_new_tokens=8)
    np.testing.assert_array_equal(batched, hf_greedy(hf, input_ids=ids, attention_mask=mask, pixel_values=pixels))
    for row in range(3):  # each row alone, unpadded (transformers; our own one-by-one: the captioner tests)
        pad = int((mask[row] == 0).sum())
        alone = hf_greedy(hf, input_ids=ids[row:row + 1, pad:], pixel_values=pixels[row:row + 1])
        assert_same_as_alone(alone[0], batched[row, pad:])
    pad = int((mask[0] == 0).sum())  # and ours alone for the most padded row (PyNative: no compile)
    ours.use_jit = False
    try:
        assert_same_as_alone(ours.generate(pixels[:1], ids[:1, pad:], max_new_tokens=8, use_jit=False)[0],
                             batched[0, pad:])
    finally:
        ours.use_jit = True


def test_llama_variant_logits_equal_transformers(tmp_path):
    """Attention bias, tied embeddings, linear RoPE scaling, head_dim != hidden/heads, no grouping."""
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, head_dim=16, attention_bias=True,
                                      tie_word_embeddings=True, rope_scaling=dict(rope_type="linear", factor=2.0))
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    _randomize(hf, 3)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained_llama(tmp_path)
    ids, mask = left_pad([[5, 9, 11, 40], [7, 8, 9, 10, 11, 12, 13]])
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = ours(input_ids=ids, attention_mask=mask).logits.asnumpy()
    assert np.abs(ref - got)[mask.astype(bool)].max() < 1e-4


def from_pretrained_llama(folder: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(folder))
    load_checkpoint(model, folder)
    return model


PUBLISHED_PREFIXES = ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
                      "multi_modal_projector.")


@pytest.mark.parametrize("layout", ["published", "transformers4"])
def test_published_and_transformers4_layouts_load_and_missing_tensor_fails(llava, tmp_path, layout):
    """The llava-hf hub layout and config.json (which transformers 5.25 loads as they are) and transformers 4's
    save_pretrained layout load as the fixture's transformers 5.25 save_pretrained layout does; a missing tensor
    is named."""
    hf, ours, _ = llava
    folder = tmp_path / layout
    save_checkpoint(folder, "llava", published=True)
    keys = load_file(str(folder / "model.safetensors"))
    assert all(k.startswith(PUBLISHED_PREFIXES) for k in keys)
    if layout == "published":
        theirs, info = transformers.LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
        assert not any(info.values()), info
        for name, param in hf.state_dict().items():
            torch.testing.assert_close(theirs.state_dict()[name], param, rtol=0, atol=0)
        missing = "language_model.model.layers.1.mlp.up_proj.weight"
    else:
        rename_keys(folder, TRANSFORMERS4)
        keys = load_file(str(folder / "model.safetensors"))
        assert "model.vision_tower.vision_model.embeddings.class_embedding" in keys and "lm_head.weight" in keys
        missing = "model.language_model.layers.1.mlp.up_proj.weight"
    text_config = json.loads((folder / "config.json").read_text())["text_config"]
    assert "rope_parameters" not in text_config and text_config["rope_scaling"]["rope_type"] == "llama3"
    reloaded = from_pretrained(folder)
    for (name, a), (_, b) in zip(ours.parameters_and_names(), reloaded.parameters_and_names()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=name)
    # RoPE from the published config.json (rope_theta, rope_scaling) as from transformers 5's (rope_parameters)
    np.testing.assert_array_equal(reloaded.language_model.model.inv_freq.asnumpy(),
                                  ours.language_model.model.inv_freq.asnumpy())

    del keys[missing]
    save_file(keys, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing: language_model\.model\.layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(folder)


def test_clip_preprocessing_equals_transformers(llava):
    _, _, folder = llava
    frames = np.random.default_rng(2).integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    ref = transformers.CLIPImageProcessor.from_pretrained(folder)(list(frames), return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(ClipFrameProcessor.from_pretrained(folder)(frames), ref)
    tall = np.random.default_rng(3).integers(0, 256, (2, 90, 60, 3), dtype=np.uint8)
    ref = transformers.CLIPImageProcessor.from_pretrained(folder)(list(tall), return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(ClipFrameProcessor.from_pretrained(folder)(tall), ref)


def test_llava_next_parity_with_tiles(tmp_path):
    hf = save_checkpoint(tmp_path, "next", published=True)
    ours = from_pretrained(tmp_path)
    assert type(ours) is LlavaNextForConditionalGeneration
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (40, 70, 3), dtype=np.uint8), rng.integers(0, 256, (60, 30, 3), dtype=np.uint8),
              rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)]
    ref = transformers.LlavaNextImageProcessor.from_pretrained(tmp_path)(images, return_tensors="np")
    processor = LlavaNextFrameProcessor.from_pretrained(tmp_path)
    mine = [processor(image[None]) for image in images]
    tiles = ref["pixel_values"].shape[1]
    assert tiles > 3, "the test images should need several tiles"
    for i, (pixels, sizes) in enumerate(mine):
        np.testing.assert_array_equal(pixels[0], ref["pixel_values"][i][:pixels.shape[1]])
        np.testing.assert_array_equal(sizes[0], ref["image_sizes"][i])
    counts = [ours.image_token_count(s) for s in ref["image_sizes"]]
    hf_processor = transformers.LlavaNextProcessor(
        image_processor=transformers.LlavaNextImageProcessor.from_pretrained(tmp_path),
        tokenizer=transformers.AutoTokenizer.from_pretrained(tmp_path), patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1)
    expanded = hf_processor(images=images, text=["<image>"] * 3, return_tensors="np")["input_ids"]
    assert counts == [int((row == IMAGE_TOKEN).sum()) for row in expanded]

    rows = []
    for row, count in enumerate(counts):
        text = [int(t) for t in rng.integers(5, 90, 2 + 2 * row)]
        rows.append(text[:1] + [IMAGE_TOKEN] * count + text[1:])
    ids, mask = left_pad(rows)
    inputs = dict(pixel_values=ref["pixel_values"], image_sizes=ref["image_sizes"])
    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    **{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    got = ours(input_ids=ids, attention_mask=mask, **inputs).logits.asnumpy()
    assert np.abs(logits - got)[mask.astype(bool)].max() < 1e-4
    batched = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **inputs)
    np.testing.assert_array_equal(batched, hf_greedy(hf, input_ids=ids, attention_mask=mask, **inputs))
    for row in range(3):
        pad = int((mask[row] == 0).sum())
        alone = hf_greedy(hf, pixel_values=mine[row][0], image_sizes=mine[row][1], input_ids=ids[row:row + 1, pad:])
        assert_same_as_alone(alone[0], batched[row, pad:])


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def hf_caption(hf, folder: Path, video: Path, num_frames: int) -> str:
    """transformers' processor-free reference: CLIPImageProcessor frames, prompt expanded as LlavaProcessor does."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    frames, _ = sample_frames(str(video), num_frames=num_frames)
    pixels = transformers.CLIPImageProcessor.from_pretrained(folder)(list(frames), return_tensors="pt")["pixel_values"]
    prompt = "USER: " + "\n".join(["<image>"] * num_frames) + "\nDescribe the video in detail ASSISTANT:"
    processor = transformers.LlavaProcessor(image_processor=transformers.CLIPImageProcessor.from_pretrained(folder),
                                            tokenizer=tokenizer, patch_size=14, num_additional_image_tokens=1,
                                            vision_feature_select_strategy="default")
    ids = torch.from_numpy(processor(images=list(frames), text=prompt, return_tensors="np")["input_ids"])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_caption_llava_batched_equals_one_by_one_and_transformers(llava, videos, tmp_path):
    hf, _, folder = llava
    batched, single = tmp_path / "b.csv", tmp_path / "s.csv"
    common = [str(videos), "--pretrained_model_name_or_path", str(folder), "--num_frames", "2", *GEN]
    llava_main(common + ["--output", str(batched), "--bs", "4"])
    llava_main(common + ["--output", str(single), "--bs", "1"])
    rows = read_rows(batched)
    assert [r["clip_id"] for r in rows] == ["c00", "c01", "c02", "c03", "bad"]
    assert rows[-1]["status"] == "error" and "broken.mp4" in rows[-1]["error"]
    texts = [r["text"] for r in rows]
    assert texts == [r["text"] for r in read_rows(single)]
    assert all(texts[:4]) and len(set(texts[:4])) > 1, "captions should depend on the video"
    for row in rows[:2]:
        assert row["text"] == hf_caption(hf, folder, videos.parent / row["path"], num_frames=2)


def test_caption_llava_next_end_to_end(videos, tmp_path):
    folder = tmp_path / "next"
    save_checkpoint(folder, "next")
    out = tmp_path / "out.csv"
    llava_main([str(videos), "--pretrained_model_name_or_path", str(folder), "--output", str(out), "--bs", "4",
                "--prompt_template", "[INST] <image>\n{question} [/INST]", *GEN])
    rows = read_rows(out)
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["error"]
    assert all(r["text"] for r in rows[:4])


def test_caption_llava_under_msrun(llava, videos, tmp_path):
    _, _, folder = llava
    out = tmp_path / "captions.csv"
    result = run_msrun(ROOT / "pipeline/captioning/caption_llava.py",
                       [str(videos), "--pretrained_model_name_or_path", str(folder), "--output", str(out),
                        "--bs", "2", *GEN], cwd=tmp_path)
    assert result.returncode == 0, result.problems
    rows = read_rows(out)
    assert sorted(r["clip_id"] for r in rows) == ["bad", "c00", "c01", "c02", "c03"]
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["error"]
    assert "rank 1 of 2" in result.logs


def test_visual_token_budget_keeps_fewer_frames(llava, videos, tmp_path):
    """A budget of two frames' image tokens keeps 2 of 4 frames; one below a frame's count is an error row."""
    from models import from_pretrained

    _, _, folder = llava
    per_frame = from_pretrained(str(folder)).image_token_count()
    out = tmp_path / "budget.csv"
    common = [str(videos), "--pretrained_model_name_or_path", str(folder), "--num_frames", "4", "--bs", "4", *GEN]
    llava_main(common + ["--output", str(out), "--max_visual_tokens", str(2 * per_frame + 1)])
    rows = read_rows(out)[:4]
    assert [r["status"] for r in rows] == ["ok"] * 4 and all(r["text"] for r in rows)
    assert {(r["num_frames_used"], r["visual_tokens"], r["visual_token_budget"]) for r in rows} == {
        ("2", str(2 * per_frame), str(2 * per_frame + 1))}
    tiny = tmp_path / "tiny.csv"
    with pytest.raises(SystemExit):  # every row fails: the run says so
        llava_main(common + ["--output", str(tiny), "--max_visual_tokens", str(per_frame - 1)])
    errors = [r["error"] for r in read_rows(tiny)]
    assert all("visual tokens, more than the budget" in e for e in errors[:4])
