"""Kinetic-GEBC: the annotation reader, per-boundary captioning with Video-LLaMA (resume, batching), per-type
scores, and training on boundaries (frames from each boundary's window, one question per caption type).

The data are synthetic shape clips whose event happens at a known time (a square turns
from red to blue at 1.0 s, a circle appears at 0.75 s), annotated in the challenge's format.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.checkpoint import load_tokenizer
from models.video_llama.modeling import VideoLlamaForConditionalGeneration
from pipeline.captioning.caption_videollama import VideoLlamaCaptioner, main as videollama_main
from pipeline.datasets import gebc
from pipeline.datasets.captions import CaptionFormatError, load_captions
from pipeline.datasets.synthetic import COLOURS, Clip, render, write_video
from pipeline.datasets.video import sample_frames
from pipeline.training import evaluate
from pipeline.training.data import VideoCaptionLoader
from pipeline.training.objectives import CaptionEncoder
from pipeline.training.train import main as train_main
from tests.test_training import flags
from tests.test_video_llama import PROMPT, TorchVideoLlama, build_folder, read_rows

FPS = 8
BOUNDARIES = {
    "square_recolour": [dict(timestamp=1.0, label="Change of Color", subject="the red square",
                             status_before="red", status_after="turn blue")],
    "circle_appears": [dict(timestamp=0.75, label="Change of Subject", subject="a green circle",
                            status_before="/0", status_after="/1", action_of_cause="appears in the middle"),
                       dict(timestamp=1.6, label="Change of Action", subject="a green circle",
                            status_before="standing still", status_after="keep still")],
}
CLIPS = {"square_recolour": Clip("red", "square", "recolour", "blue", 0),
         "circle_appears": Clip("green", "circle", "appears", "green", 1)}


def write_annotation(path: Path, boundaries: dict = BOUNDARIES, duration: float = 2.0) -> Path:
    """The challenge's per-boundary JSON (as LLMVA-GEBC's valset_highest_f1.json)."""
    data = {}
    for video_id, items in boundaries.items():
        times = [b["timestamp"] for b in items]
        data[video_id] = [{"boundary_id": f"{video_id}_{i}", "prev_timestamp": ([0] + times)[i],
                           "next_timestamp": (times + [duration])[i + 1], "action_of_cause": None, **b,
                           "caption": gebc.boundary_caption(b["subject"], b["status_before"], b["status_after"])}
                          for i, b in enumerate(items)]
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two 2 s clips (16 frames at 8 fps) and their annotation."""
    root = tmp_path_factory.mktemp("gebc")
    for video_id, clip in CLIPS.items():
        write_video(root / f"{video_id}.mp4", render(clip, num_frames=16, size=56), fps=FPS)
    return write_annotation(root / "val.json")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_folder(TorchVideoLlama(), tmp_path_factory.mktemp("gebc_llama"))


def test_reader_gives_a_window_per_boundary(dataset):
    table = gebc.read_boundaries(dataset, window=1.0)
    assert list(table["boundary_id"]) == ["square_recolour_0", "circle_appears_0", "circle_appears_1"]
    assert list(table["path"]) == ["square_recolour.mp4", "circle_appears.mp4", "circle_appears.mp4"]
    assert list(table["boundary"]) == ["0", "0", "1"]
    assert list(table["boundary_time"]) == ["1", "0.75", "1.6"]
    # +-1 s, clamped at 0 and at the video's end (the last boundary's next_timestamp)
    assert list(zip(table["start"], table["end"])) == [("0.000", "2.000"), ("0.000", "1.750"), ("0.600", "2.000")]
    assert list(table["ref_status_after"]) == ["turn blue", "/1", "keep still"]
    refs = gebc.references(table)
    assert refs["subject"]["circle_appears_1"] == ["a green circle"]
    assert refs["status_before"] == {"square_recolour_0": ["red"], "circle_appears_0": ["/0"],
                                     "circle_appears_1": ["standing still"]}


def test_reader_without_captions_has_empty_references(tmp_path):
    test_split = {"vid": [{"boundary_id": "vid_0", "timestamp": 3.2, "prev_timestamp": 0, "next_timestamp": 9.9,
                           "label": "Change of Action"}]}
    (tmp_path / "test.json").write_text(json.dumps(test_split))
    table = gebc.read_boundaries(tmp_path / "test.json", window=0.5, video_template="videos/{video_id}.webm")
    assert table.loc[0, ["path", "start", "end", "ref_subject"]].tolist() == ["videos/vid.webm", "2.700", "3.700", ""]
    assert gebc.references(table)["subject"] == {}


@pytest.mark.parametrize("content, problem", [
    ('{"vid": [{"boundary_id": "vid_0", "timestamp": "soon"}]}', r"video 'vid' boundary 0: 'timestamp' must be"),
    ('{"vid": {"timestamp": 1.0}}', r"video 'vid': expected a list of boundary objects"),
    ('[{"timestamp": 1.0}]', r"the top level is list"),
    ('{"vid": [{"timestamp": 1.0, "subject": 3}]}', r"'subject' must be a string"),
    ('{"vid": [{"timestamp": 1.0', r"not valid JSON"),
])
def test_malformed_annotation_names_the_file(tmp_path, content, problem):
    bad = tmp_path / "broken_gebc.json"
    bad.write_text(content)
    with pytest.raises(CaptionFormatError, match=rf"broken_gebc\.json: .*{problem}.*expected Kinetic-GEBC"):
        gebc.read_boundaries(bad)


@pytest.fixture
def calls(monkeypatch):
    """The batch sizes of the captioner's generate calls and the prompt rows of the model's."""
    record = {"captioner": [], "model": [], "frames": []}
    generate, model_generate, prepare = (VideoLlamaCaptioner.generate, VideoLlamaForConditionalGeneration.generate,
                                         VideoLlamaCaptioner.prepare)

    def counted(self, batch):
        record["captioner"].append(len(batch))
        if record.get("interrupt_at") == len(record["captioner"]):
            raise KeyboardInterrupt
        return generate(self, batch)

    def counted_model(self, pixel_values, input_ids, *args, **kwargs):
        record["model"].append(len(input_ids))
        return model_generate(self, pixel_values, input_ids, *args, **kwargs)

    def seen(self, frames):
        record["frames"].append(frames)
        return prepare(self, frames)

    monkeypatch.setattr(VideoLlamaCaptioner, "generate", counted)
    monkeypatch.setattr(VideoLlamaForConditionalGeneration, "generate", counted_model)
    monkeypatch.setattr(VideoLlamaCaptioner, "prepare", seen)
    return record


def test_boundaries_captioned_resumed_and_batched(dataset, folder, tmp_path, calls):
    common = [str(dataset), "--task", "gebc", "--pretrained_model_name_or_path", str(folder), "--num_frames", "3",
              "--max_new_tokens", "4", "--boundary_window", "0.5", "--device", "CPU", "--decode_timeout", "0"]
    batched = tmp_path / "batched.csv"
    videollama_main(common + ["--output", str(batched), "--bs", "3"])
    assert calls["captioner"] == [3] and calls["model"] == [9], "one generate call: 3 questions x 3 boundaries"
    rows = read_rows(batched)
    assert [r["boundary_id"] for r in rows] == ["square_recolour_0", "circle_appears_0", "circle_appears_1"]
    assert [(r["start"], r["end"]) for r in rows] == [("0.500", "1.500"), ("0.250", "1.250"), ("1.100", "2.000")]
    assert all(r["status"] == "ok" for r in rows)
    for row in rows:
        assert row["subject"] and row["status_before"] and row["status_after"]
        assert row["text_raw"] or row["text"] == gebc.boundary_caption(
            row["subject"], row["status_before"], row["status_after"])
        assert row["prompt"].startswith("What is the subject of the event")
    assert len({(r["subject"], r["status_before"], r["status_after"]) for r in rows}) > 1, "answers depend on video"
    # the frames come from around each boundary: red before the square's change at 1.0 s, blue after it
    square = next(f for f in calls["frames"] if (np.abs(f[0].astype(int) - COLOURS["red"]).sum(-1) < 60).any())
    assert (np.abs(square[-1].astype(int) - COLOURS["blue"]).sum(-1) < 60).any()
    assert not (np.abs(square[-1].astype(int) - COLOURS["red"]).sum(-1) < 60).any()

    single = tmp_path / "single.csv"
    calls.update(captioner=[], model=[], interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):  # killed in its second batch
        videollama_main(common + ["--output", str(single), "--bs", "1"])
    assert len(pd.read_csv(tmp_path / "single.csv.part0.csv")) == 1
    calls.update(captioner=[], model=[], interrupt_at=None)
    videollama_main(common + ["--output", str(single), "--bs", "1"])
    assert calls["captioner"] == [1, 1] and calls["model"] == [3, 3], "only the two boundaries not yet done"
    fields = ["boundary_id", "subject", "status_before", "status_after", "text"]
    assert [[r[f] for f in fields] for r in read_rows(single)] == [[r[f] for f in fields] for r in rows]

    calls.update(captioner=[])
    videollama_main(common + ["--output", str(single), "--bs", "1"])
    assert calls["captioner"] == [], "a finished run redoes no boundary"


def test_scores_per_caption_type(dataset, tmp_path, capsys):
    table = gebc.read_boundaries(dataset)
    predictions = table[["path", "boundary_id"]].assign(
        subject=table["ref_subject"], status_before=["red", "/1", "moving fast"],
        status_after=["purple circle", "nothing", "shrinks away"], status="ok", text="")
    predictions.loc[len(predictions)] = ["x.mp4", "circle_appears_1", "a red cat", "", "", "error", ""]
    csv = tmp_path / "pred.csv"
    predictions.to_csv(csv, index=False)
    scores = evaluate.main(["--gebc", str(dataset), "--predictions", str(csv), "--spice", "off",
                            "--output_json", str(tmp_path / "scores.json")])
    assert list(scores) == ["subject", "status_before", "status_after"]
    assert scores["subject"]["Bleu_1"] == pytest.approx(1.0) and scores["subject"]["ROUGE_L"] == pytest.approx(1.0)
    assert 0 < scores["status_before"]["ROUGE_L"] < 1
    assert scores["status_after"]["ROUGE_L"] == pytest.approx(0.0)
    out = capsys.readouterr().out
    assert all(f"{field}\nmetric" in out for field in gebc.FIELDS) and out.count("CIDEr") == 3
    assert json.loads((tmp_path / "scores.json").read_text())["scores"]["subject"]["ROUGE_L"] == pytest.approx(1.0)


def test_annotation_gives_three_training_samples_per_boundary(dataset, tmp_path):
    questions = gebc.read_questions(gebc.DEFAULT_QUESTIONS)
    records = load_captions(dataset, boundary_window=0.5)  # the format is detected
    assert [r.video_id for r in records[:3]] == [f"square_recolour_0:{field}" for field in gebc.FIELDS]
    assert len(records) == 9 and all(Path(r.path).is_file() for r in records)
    assert [(r.captions, r.question, r.group) for r in records[6:]] == [
        (("a green circle",), questions["subject"], "subject"),
        (("standing still",), questions["status_before"], "status_before"),
        (("keep still",), questions["status_after"], "status_after")]
    assert [(r.start, r.end) for r in records[::3]] == [(0.5, 1.5), (0.25, 1.25), (1.1, 2.0)]
    keep = tmp_path / "split.txt"
    keep.write_text("circle_appears\n")
    assert {r.video_id.split(":")[0] for r in load_captions(dataset, split_file=keep)} == {
        "circle_appears_0", "circle_appears_1"}
    no_references = tmp_path / "test.json"
    no_references.write_text(json.dumps({"vid": [{"boundary_id": "vid_0", "timestamp": 1.0}]}))
    with pytest.raises(CaptionFormatError, match="no boundary has a reference caption"):
        load_captions(no_references)


def test_training_frames_come_from_the_boundary_window(dataset):
    records = load_captions(dataset, boundary_window=0.25)
    loader = VideoCaptionLoader(records, 9, lambda frames: frames, num_frames=2, sampling="uniform",
                                shuffle=False, num_workers=1)
    batch = next(iter(loader))
    assert batch.questions == [r.question for r in records]
    square = batch.pixel_values[0]  # the square turns from red to blue at 1.0 s; the window is 0.75 to 1.25 s
    assert (np.abs(square[0].astype(int) - COLOURS["red"]).sum(-1) < 60).any()
    assert (np.abs(square[1].astype(int) - COLOURS["blue"]).sum(-1) < 60).any()
    whole, _ = sample_frames(records[0].path, num_frames=2)
    expected, _ = sample_frames(records[0].path, num_frames=2, start=0.75, end=1.25)
    np.testing.assert_array_equal(square, expected)
    assert not np.array_equal(square, whole)


def test_each_sample_gets_its_question_in_the_prompt(folder):
    model = VideoLlamaForConditionalGeneration.from_folder(folder)
    tokenizer = load_tokenizer(folder.parent / "llama")
    encoder = CaptionEncoder(model, tokenizer, prompt=PROMPT)
    questions = ["What is it?", "What was the subject doing before the change?"]
    captions = encoder.caption_ids(["a red square", "red"])
    tokens = encoder.encode(captions, questions=questions)
    for row, (question, caption) in enumerate(zip(questions, captions)):
        prompt = encoder.prompt_for(question)
        assert prompt == model.prompt_ids(tokenizer, PROMPT.replace("{question}", question))
        assert tokens.input_ids[row, :len(prompt)].tolist() == prompt
        assert tokens.labels[row][tokens.labels[row] != -100].tolist() == caption
    ids, mask = encoder.prompt_batch(2, questions)
    short = len(encoder.prompt_for(questions[0]))
    assert mask[0].tolist() == [0] * (ids.shape[1] - short) + [1] * short, "generation prompts are left-padded"
    with pytest.raises(ValueError, match="has a {question} but the sample has no question"):
        encoder.encode(captions)
    with pytest.raises(ValueError, match="has no {question} but the sample has one"):
        CaptionEncoder(model, tokenizer, prompt="<ImageHere> Describe.").encode(captions, questions=questions)


def test_gebc_training_lowers_the_loss_and_scores_each_caption_type(dataset, folder, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.training.train")
    results = train_main(flags(folder, dataset, tmp_path, prompt=PROMPT, boundary_window=0.5, batch_size=9,
                               max_steps=4, lr=3e-3, min_lr=3e-3, val_annotations=dataset, eval_batch_size=9,
                               num_beams=1, max_new_tokens=3, export=False))
    losses = [r.loss for r in results]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, losses
    evaluation = next(r.getMessage() for r in caplog.records if "evaluation" in r.getMessage())
    for field in gebc.FIELDS:
        assert f"{field}/CIDEr" in evaluation and f"{field}/Bleu_4" in evaluation


def test_gebc_scst_step_asks_each_question(dataset, folder, tmp_path, calls):
    results = train_main(flags(folder, dataset, tmp_path, mode="scst", prompt=PROMPT, batch_size=3, max_steps=1,
                               scst_num_candidates=2, lr=1e-5, min_lr=1e-6, export=False))
    assert len(results) == 1 and np.isfinite(results[0].loss) and 0.0 <= results[0].reward <= 10.0
    assert calls["model"] == [3], "the batch's three prompts go to one generate call"
