"""PLLaVA: parity with a reference composed from transformers' LLaVA submodules + torch AdaptiveAvgPool3d
(tiny random fp32 model, LoRA-wrapped published weights), pooling, preprocessing, and caption_pllava.py
end to end (in process and under msrun)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from mindspore import Tensor
from transformers.image_transforms import resize
from transformers.image_utils import PILImageResampling

from models import from_pretrained
from models.llava import PllavaForConditionalGeneration
from models.llava.modeling import adaptive_avg_pool3d
from models.llava.processing import PllavaFrameProcessor
from pipeline import distributed
from pipeline.captioning.caption_pllava import main as pllava_main
from pipeline.datasets.video import sample_frames
from tests.llava_fixtures import IMAGE_TOKEN, POOLING, left_pad, make_videos, save_checkpoint
from tests.msrun import run_msrun

distributed.setup("CPU")  # at collection, before any kernel runs, so in-process captioning can use it

ROOT = Path(__file__).resolve().parents[1]
GEN = ["--max_new_tokens", "6", "--device", "CPU", "--no-cleanup"]  # raw model text
FRAMES = POOLING["num_frames"]


@pytest.fixture(scope="module")
def pllava(tmp_path_factory):
    """(transformers LLaVA holding the merged LoRA weights, our PLLaVA from the LoRA-wrapped layout, folder)."""
    folder = tmp_path_factory.mktemp("pllava")
    hf = save_checkpoint(folder, "pllava", seed=1, lora=True)
    return hf, from_pretrained(folder), folder


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return make_videos(tmp_path_factory.mktemp("videos"))


def reference_embeds(hf, pixels: np.ndarray, ids: np.ndarray, pooling_shape) -> torch.Tensor:
    """PLLaVA's forward from transformers parts: CLIP layer -2 without CLS -> projector -> pool -> scatter."""
    batch, frames = pixels.shape[:2]
    with torch.no_grad():
        hidden = hf.model.vision_tower(torch.from_numpy(pixels.reshape((-1,) + pixels.shape[2:])),
                                       output_hidden_states=True).hidden_states[-2][:, 1:]
        features = hf.model.multi_modal_projector(hidden)
        side = int(features.shape[1] ** 0.5)
        video = features.reshape(batch, frames, side, side, -1).permute(0, 4, 1, 2, 3)
        pooled = torch.nn.AdaptiveAvgPool3d(tuple(pooling_shape))(video).permute(0, 2, 3, 4, 1)
        embeds = hf.get_input_embeddings()(torch.from_numpy(np.where(ids == IMAGE_TOKEN, 0, ids)))
        slots = torch.from_numpy(ids == IMAGE_TOKEN)[..., None].expand_as(embeds)
        return embeds.masked_scatter(slots, pooled.reshape(-1, pooled.shape[-1]))


def test_adaptive_avg_pool3d_equals_torch():
    rng = np.random.default_rng(0)
    for shape, out in (((2, 3, 4, 4, 5), (2, 3, 3)), ((1, 5, 7, 6, 3), (3, 4, 5)), ((1, 2, 4, 4, 2), (4, 3, 2))):
        x = rng.normal(size=shape).astype(np.float32)
        ref = torch.nn.AdaptiveAvgPool3d(out)(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        got = adaptive_avg_pool3d(Tensor(x), out).asnumpy()
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-6)


def test_pllava_lora_checkpoint_parity_and_batching(pllava):
    hf, ours, _ = pllava
    assert type(ours) is PllavaForConditionalGeneration
    assert tuple(ours.pooling_shape) == tuple(POOLING["pooling_shape"])
    count = ours.image_token_count(FRAMES)
    pixels = np.random.default_rng(5).normal(size=(3, FRAMES, 3, 56, 56)).astype(np.float32)
    rng = np.random.default_rng(6)
    rows = []
    for row in range(3):
        text = [int(t) for t in rng.integers(5, 90, 3 + 2 * row)]
        rows.append(text[:2] + [IMAGE_TOKEN] * count + text[2:])
    ids, mask = left_pad(rows)
    embeds = reference_embeds(hf, pixels, ids, POOLING["pooling_shape"])
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds, attention_mask=torch.from_numpy(mask)).logits.numpy()
        hf_ids = hf.generate(input_ids=torch.from_numpy(ids), inputs_embeds=embeds,
                             attention_mask=torch.from_numpy(mask), max_new_tokens=8, do_sample=False).numpy()
    got = ours(pixels, ids, attention_mask=mask).logits.asnumpy()
    assert np.abs(ref - got)[mask.astype(bool)].max() < 1e-4
    batched = ours.generate(pixels, ids, attention_mask=mask, max_new_tokens=8)
    np.testing.assert_array_equal(batched, hf_ids)
    for row in range(3):  # each row alone, unpadded (reference; our own one-by-one: the captioner test)
        pad = int((mask[row] == 0).sum())
        one = ids[row:row + 1, pad:]
        with torch.no_grad():
            alone = hf.generate(input_ids=torch.from_numpy(one), max_new_tokens=8, do_sample=False,
                                inputs_embeds=reference_embeds(hf, pixels[row:row + 1], one, POOLING["pooling_shape"]))
        np.testing.assert_array_equal(alone[0].numpy(), batched[row, pad:][:alone.shape[1]])
        assert (batched[row, pad + alone.shape[1]:] == 0).all()


def test_saved_layout_without_lora_loads(tmp_path):
    hf = save_checkpoint(tmp_path, "pllava", seed=2)
    ours = from_pretrained(tmp_path)
    assert type(ours) is PllavaForConditionalGeneration
    theirs = dict(hf.named_parameters())
    np.testing.assert_array_equal(ours.language_model.model.layers[0].self_attn.q_proj.weight.asnumpy(),
                                  theirs["model.language_model.layers.0.self_attn.q_proj.weight"].detach().numpy())


def test_pllava_preprocessing(pllava):
    _, _, folder = pllava
    clip = transformers.CLIPImageProcessor.from_pretrained(folder)
    processor = PllavaFrameProcessor.from_pretrained(folder)
    small = np.random.default_rng(7).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(processor(small), clip(list(small), return_tensors="np")["pixel_values"])
    # 1280x720: PllavaProcessor first resizes the short edge to int(640 / (1280 / 720)) = 360
    big = np.random.default_rng(8).integers(0, 256, (1, 720, 1280, 3), dtype=np.uint8)
    first = [resize(big[0], (360, 640), resample=PILImageResampling.BICUBIC)]
    np.testing.assert_array_equal(processor(big), clip(first, return_tensors="np")["pixel_values"])


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_caption_pllava_batched_equals_one_by_one_and_reference(pllava, videos, tmp_path):
    hf, _, folder = pllava
    batched, single = tmp_path / "b.csv", tmp_path / "s.csv"
    template = "USER: {question} </s> USER:<image> ASSISTANT:"
    common = [str(videos), "--pretrained_model_name_or_path", str(folder), "--num_frames", str(FRAMES),
              "--prompt_template", template, *GEN]
    pllava_main(common + ["--output", str(batched), "--bs", "4"])
    pllava_main(common + ["--output", str(single), "--bs", "1"])
    rows = read_rows(batched)
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["error"]
    texts = [r["text"] for r in rows]
    assert texts == [r["text"] for r in read_rows(single)]
    assert all(texts[:4]) and len(set(texts[:4])) > 1, "captions should depend on the video"

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    shape = (FRAMES,) + tuple(POOLING["pooling_shape"][1:])
    prompt = tokenizer(template.format(question="Describe the video in detail"))["input_ids"]
    at = prompt.index(IMAGE_TOKEN)
    ids = np.array([prompt[:at] + [IMAGE_TOKEN] * int(np.prod(shape)) + prompt[at + 1:]])
    frames, _ = sample_frames(str(videos.parent / rows[2]["path"]), num_frames=FRAMES)
    pixels = transformers.CLIPImageProcessor.from_pretrained(folder)(list(frames), return_tensors="np")["pixel_values"]
    embeds = reference_embeds(hf, pixels[None], ids, shape)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.from_numpy(ids), inputs_embeds=embeds, max_new_tokens=6, do_sample=False)
    assert texts[2] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_caption_pllava_under_msrun(pllava, videos, tmp_path):
    _, _, folder = pllava
    out = tmp_path / "captions.csv"
    result = run_msrun(ROOT / "pipeline/captioning/caption_pllava.py",
                       [str(videos), "--pretrained_model_name_or_path", str(folder), "--output", str(out),
                        "--num_frames", "2", "--bs", "2", *GEN], cwd=tmp_path)
    assert result.returncode == 0, result.problems
    rows = read_rows(out)
    assert sorted(r["clip_id"] for r in rows) == ["bad", "c00", "c01", "c02", "c03"]
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["error"]
    assert "rank 1 of 2" in result.logs
