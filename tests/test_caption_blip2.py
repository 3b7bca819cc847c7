"""caption_blip2.py end to end on a tiny random checkpoint: CSV in, captions out, equal to transformers."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Blip2ForConditionalGeneration as HFBlip2

from models.blip2.processing import Blip2FrameProcessor
from pipeline.captioning.caption_blip2 import main as blip2_main
from pipeline.datasets.video import sample_frames
from tests.msrun import run_msrun
from tests.tiny_models import OPT, T5, save_tiny_blip2
from tests.video_factory import write_caption_clips

ROOT = Path(__file__).resolve().parents[1]
GEN = ["--max_new_tokens", "6", "--min_new_tokens", "2", "--num_beams", "2", "--device", "CPU", "--no-cleanup"]  # raw model text


@pytest.fixture(scope="module", params=["opt", "t5"])
def checkpoint(request, tmp_path_factory) -> Path:
    text = OPT if request.param == "opt" else T5
    return save_tiny_blip2(tmp_path_factory.mktemp(f"blip2_{request.param}"), text)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return write_caption_clips(tmp_path_factory.mktemp("videos"))


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def hf_caption(folder: Path, video: Path, num_beams: int = 2) -> str:
    """transformers' own generate on the same single frame (T=1 is image BLIP-2)."""
    model = HFBlip2.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    frames, _ = sample_frames(str(video), num_frames=1)
    pixels = torch.from_numpy(Blip2FrameProcessor.from_pretrained(folder, image_size=28)(frames))
    image_tokens = [model.config.image_token_index] * model.config.num_query_tokens
    input_ids = torch.tensor([image_tokens + tokenizer("a video of")["input_ids"]])
    with torch.no_grad():
        ids = model.generate(pixel_values=pixels, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=6, min_new_tokens=2, num_beams=2)
    if model.config.use_decoder_only_language_model:
        ids = ids[:, input_ids.shape[1]:]
    return tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()


def test_single_frame_captions_equal_transformers(checkpoint, videos, tmp_path):
    out = tmp_path / "out.csv"
    blip2_main([str(videos), "--pretrained_model_name_or_path", str(checkpoint), "--output", str(out),
                "--num_frames", "1", "--bs", "3", *GEN])
    rows = read_rows(out)
    assert [r["clip_id"] for r in rows] == ["c00", "c01", "c02", "c03", "bad"]
    assert rows[-1]["status"] == "error" and "broken.mp4" in rows[-1]["error"]
    for row in rows[:-1]:
        assert row["status"] == "ok"
        assert row["text"] == hf_caption(checkpoint, videos.parent / row["path"])


def test_batched_video_captions_equal_one_by_one(checkpoint, videos, tmp_path):
    batched, single = tmp_path / "b.csv", tmp_path / "s.csv"
    common = [str(videos), "--pretrained_model_name_or_path", str(checkpoint), "--num_frames", "3", *GEN]
    blip2_main(common + ["--output", str(batched), "--bs", "4"])
    blip2_main(common + ["--output", str(single), "--bs", "1"])
    texts = [r["text"] for r in read_rows(batched)]
    assert texts == [r["text"] for r in read_rows(single)]
    assert all(texts[:4]) and len(set(texts[:4])) > 1, "captions should depend on the video"


def test_missing_checkpoint_folder_fails_clearly(videos, tmp_path):
    with pytest.raises(SystemExit) as err:
        blip2_main([str(videos), "--pretrained_model_name_or_path", str(tmp_path / "nowhere"), "--device", "CPU"])
    assert "nowhere" in str(err.value)


def test_caption_blip2_under_msrun(videos, tmp_path_factory, tmp_path):
    checkpoint = save_tiny_blip2(tmp_path_factory.mktemp("blip2_msrun"), OPT)
    out = tmp_path / "captions.csv"
    result = run_msrun(ROOT / "pipeline/captioning/caption_blip2.py",
                       [str(videos), "--pretrained_model_name_or_path", str(checkpoint), "--output", str(out),
                        "--num_frames", "2", *GEN], cwd=tmp_path)
    assert result.returncode == 0, result.problems
    rows = read_rows(out)
    assert sorted(r["clip_id"] for r in rows) == ["bad", "c00", "c01", "c02", "c03"]
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["error"]
    assert "rank 1 of 2" in result.logs
    assert len({r["path"] for r in rows}) == 5
