"""Caption annotation formats (auto-detection, errors, video paths) and the training data loader."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline.datasets.captions import (
    CaptionFormatError,
    detect_format,
    load_captions,
    references,
    training_samples,
)
from pipeline.training.data import VideoCaptionLoader
from tests.video_factory import read_index, write_corrupt, write_index_video

CAPTIONS = {"video0": ["a man plays guitar", "someone plays music"], "video1": ["a dog runs"]}


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"\0")


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _fixtures(tmp: Path) -> dict[str, Path]:
    """The same two videos' captions in every supported format."""
    pairs = [(v, c) for v, caps in CAPTIONS.items() for c in caps]
    files = {
        "msrvtt": _write_json(tmp / "videodatainfo.json", {
            "info": {}, "videos": [{"video_id": "video0", "split": "train", "url": "u"},
                                   {"video_id": "video1", "split": "train"},
                                   {"video_id": "video9", "split": "test"}],
            "sentences": [{"video_id": v, "caption": c, "sen_id": i} for i, (v, c) in enumerate(pairs)]
            + [{"video_id": "video9", "caption": "a test video"}]}),
        "vatex": _write_json(tmp / "vatex_training_v1.0.json",
                             [{"videoID": v, "enCap": caps, "chCap": ["x"]} for v, caps in CAPTIONS.items()]),
        "coco": _write_json(tmp / "coco_train.json", {
            "images": [{"id": v, "file_name": f"{v}.mp4"} for v in CAPTIONS],
            "annotations": [{"image_id": v, "caption": c, "id": i} for i, (v, c) in enumerate(pairs)]}),
        "lavis": _write_json(tmp / "lavis_train.json",
                             [{"video": f"{v}.mp4", "caption": c, "image_id": v} for v, c in pairs]),
    }
    files["msvd"] = tmp / "AllVideoDescriptions.txt"
    files["msvd"].write_text("# header comment\n" + "".join(f"{v} {c}\n" for v, c in pairs) + "\n")
    files["csv"] = tmp / "meta.csv"
    files["csv"].write_text("path,text\n" + "".join(f"{v}.mp4,{c}\n" for v, c in pairs))
    return files


@pytest.fixture
def fixtures(tmp_path) -> dict[str, Path]:
    _touch(tmp_path / "videos", "video0.mp4", "video1.mp4")
    _touch(tmp_path, "video0.mp4", "video1.mp4")  # next to the annotations, for csv/coco/lavis defaults
    return _fixtures(tmp_path)


@pytest.mark.parametrize("fmt", ["msrvtt", "msvd", "vatex", "coco", "lavis", "csv"])
def test_every_format_gives_the_same_records(fixtures, fmt):
    path = fixtures[fmt]
    assert detect_format(path) == fmt
    split = "train" if fmt == "msrvtt" else None
    root = path.parent / "videos"
    records = load_captions(path, video_root=root, split=split)
    ids = {f"{v}.mp4": v for v in CAPTIONS} if fmt == "csv" else {v: v for v in CAPTIONS}  # csv: raw path
    assert {ids[r.video_id]: list(r.captions) for r in records} == CAPTIONS
    assert [r.path for r in records] == [str(root / f"{v}.mp4") for v in CAPTIONS]
    assert load_captions(path, format=fmt, video_root=root, split=split) == records


def test_lavis_caption_lists_and_video_stem_as_id(tmp_path):
    path = _write_json(tmp_path / "ann.json", [{"video": "clips/a.mp4", "caption": ["one", "two"]},
                                                {"video": "clips/a.mp4", "caption": "three"}])
    (record,) = load_captions(path)
    assert record.video_id == "a" and record.captions == ("one", "two", "three")
    assert record.path == str(tmp_path / "clips" / "a.mp4")


def test_msrvtt_split_and_msvd_split_file(fixtures, tmp_path):
    (test,) = load_captions(fixtures["msrvtt"], split="test", video_root=tmp_path / "videos")
    assert test.video_id == "video9" and test.captions == ("a test video",)
    assert len(load_captions(fixtures["msrvtt"], video_root=tmp_path / "videos")) == 3
    ids = tmp_path / "test_list.txt"
    ids.write_text("video1\n\n")
    (only,) = load_captions(fixtures["msvd"], split_file=ids, video_root=tmp_path / "videos")
    assert only.video_id == "video1"


def test_video_extensions_template_and_missing(tmp_path, caplog):
    _touch(tmp_path / "v", "video0.webm", "video1.avi", "video1.mkv")
    ann = _write_json(tmp_path / "vatex.json", [{"videoID": v, "enCap": ["c"]} for v in ("video0", "video1", "gone")])
    with caplog.at_level(logging.WARNING):
        records = load_captions(ann, video_root=tmp_path / "v")
    assert [Path(r.path).name for r in records] == ["video0.webm", "video1.avi", "gone.mp4"]
    assert "1 of 3 videos not found" in caplog.text
    templated = load_captions(ann, video_root=tmp_path / "v", video_template="{video_id}.mkv")
    assert [Path(r.path).name for r in templated] == ["video0.mkv", "video1.mkv", "gone.mkv"]


def test_training_and_evaluation_samples(fixtures, tmp_path):
    records = load_captions(fixtures["vatex"], video_root=tmp_path / "videos")
    samples = training_samples(records)
    assert [(s.video_id, s.captions) for s in samples] == [
        ("video0", ("a man plays guitar",)), ("video0", ("someone plays music",)), ("video1", ("a dog runs",))]
    assert references(records) == CAPTIONS


@pytest.mark.parametrize("name, content, fmt, message", [
    ("x.yaml", "a: 1", "auto", "cannot tell the format from the suffix '.yaml'"),
    ("x.json", "{not json", "auto", "not valid JSON"),
    ("x.json", '{"foo": []}', "auto", "unknown caption JSON: found a JSON object with keys ['foo']"),
    ("x.json", '[{"foo": 1}]', "auto", "expected an object with 'videos' and 'sentences' (MSR-VTT)"),
    ("x.json", '{"videos": [{"video_id": 1}], "sentences": [{"video_id": 1}]}', "auto",
     "entry 0 of 'sentences' lacks ['caption']"),
    ("x.json", '[{"videoID": "a", "enCap": ["c"]}]', "coco", "expected a JSON object with a 'annotations' list"),
    ("x.txt", "video0\n", "auto", "line 1 has no caption after the video id"),
    ("x.csv", "path,caption\na.mp4,c\n", "auto", "missing required column(s) 'text'"),
    ("x.json", '[{"videoID": "a", "enCap": []}]', "auto", "no captioned videos found (format vatex)"),
    ("x.json", '[{"videoID": "a", "enCap": ["c"]}]', "parquet", "unknown format 'parquet'"),
])
def test_errors_name_the_file_and_what_was_expected(tmp_path, name, content, fmt, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CaptionFormatError) as info:
        load_captions(path, format=fmt)
    assert str(path) in str(info.value) and message in str(info.value)


def test_split_errors(fixtures, tmp_path):
    with pytest.raises(CaptionFormatError, match="splits in the file: \\['test', 'train'\\]"):
        load_captions(fixtures["msrvtt"], split="val")
    with pytest.raises(CaptionFormatError, match="only applies to MSR-VTT"):
        load_captions(fixtures["vatex"], split="test")
    with pytest.raises(CaptionFormatError, match="annotation file not found"):
        load_captions(tmp_path / "nope.json")


# ----------------------------------------------------------------------------- data loader

NUM_VIDEOS = 6


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """Six barcode videos (40 frames; frame i shows i), two captions each: 12 training samples."""
    folder = tmp_path_factory.mktemp("loader_videos")
    ann = [{"videoID": f"v{i}", "enCap": [f"video {i} caption a", f"video {i} caption b"]} for i in range(NUM_VIDEOS)]
    for i in range(NUM_VIDEOS):
        write_index_video(folder / f"v{i}.mp4", 40, width=64, height=48)
    return training_samples(load_captions(_write_json(folder / "ann.json", ann)))


def frame_numbers(frames: np.ndarray) -> np.ndarray:
    """A stand-in preprocessor: the barcode index of every frame, so batches show what was sampled."""
    return np.array([read_index(frame) for frame in frames])


def _loader(samples, **kwargs) -> VideoCaptionLoader:
    options = dict(batch_size=2, preprocess=frame_numbers, num_frames=4, seed=7, num_workers=2)
    return VideoCaptionLoader(samples, **{**options, **kwargs})


def _run(loader: VideoCaptionLoader, epochs: int) -> list[tuple[list[int], np.ndarray]]:
    return [(batch.indices, batch.pixel_values) for _ in range(epochs) for batch in loader]


def test_shards_are_disjoint_and_cover_the_global_batch(samples):
    ranks = [_loader(samples, rank=r, world_size=2) for r in range(2)]
    single = _loader(samples, batch_size=4)
    assert len(ranks[0]) == len(single) == 3
    for step, (b0, b1, whole) in enumerate(zip(ranks[0], ranks[1], single)):
        assert len(b0.indices) == len(b1.indices) == 2
        assert not set(b0.indices) & set(b1.indices)
        assert b0.indices + b1.indices == whole.indices
        assert whole.indices == list(single.epoch_order(0)[4 * step:4 * step + 4])
        np.testing.assert_array_equal(np.concatenate([b0.pixel_values, b1.pixel_values]), whole.pixel_values)
        assert b0.captions == [samples[i].captions for i in b0.indices]


def test_epoch_without_drop_last_visits_every_sample_once(samples):
    loader = _loader(samples, batch_size=5, drop_last=False, sampling="uniform")
    batches = list(loader)
    assert [len(b.indices) for b in batches] == [5, 5, 2]
    assert sorted(i for b in batches for i in b.indices) == list(range(len(samples)))
    assert all((b.pixel_values == [5, 15, 25, 35]).all() for b in batches)  # uniform: segment centres


def test_resume_gives_the_same_batches_as_an_uninterrupted_run(samples):
    reference = _run(_loader(samples), epochs=2)  # 6 steps per epoch
    for stop in (0, 4, 6, 9):
        first = _loader(samples)
        done = []
        while len(done) < stop:  # a training loop: take a batch, train on it, maybe save
            for batch in first:
                done.append((batch.indices, batch.pixel_values))
                if len(done) == stop:
                    break
        state = first.state_dict()
        resumed = _loader(samples)
        resumed.load_state_dict(state)
        remaining_epochs = 2 - state["epoch"]
        rest = _run(resumed, epochs=remaining_epochs)
        assert len(done) + len(rest) == len(reference)
        for (i_a, px_a), (i_b, px_b) in zip(done + rest, reference):
            assert i_a == i_b
            np.testing.assert_array_equal(px_a, px_b)


def test_headtail_is_reproducible_per_epoch_and_sample(samples):
    a, b = _run(_loader(samples), 2), _run(_loader(samples), 2)
    for (ia, pa), (ib, pb) in zip(a, b):
        assert ia == ib
        np.testing.assert_array_equal(pa, pb)
    frames = np.concatenate([px for _, px in a])
    assert np.all(frames[:, :2] < 20) and np.all(frames[:, 2:] >= 20)  # 2 from each half of 40 frames
    assert len({tuple(row) for row in frames}) > 4  # random, not one fixed pattern
    reordered = _run(_loader(samples, shuffle=False, seed=7), 1)
    by_index = {i: px for idx, pxs in a[:6] for i, px in zip(idx, pxs)}  # epoch 0
    for idx, pxs in reordered:
        for i, px in zip(idx, pxs):
            np.testing.assert_array_equal(px, by_index[i])  # frames depend on (seed, epoch, sample), not order


def test_unreadable_video_is_replaced_or_dropped(samples, tmp_path, caplog):
    bad = [s for s in samples]
    bad[3] = type(bad[3])("broken", str(write_corrupt(tmp_path / "broken.mp4")), ("bad",))
    loader = _loader(bad, shuffle=False)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert all(len(b.indices) == 2 for b in batches)
    assert batches[1].indices == [2, 4]  # position 3 replaced by the next sample in the order
    assert loader.unreadable == {3} and loader.num_replaced == 1
    assert caplog.text.count("skipping unreadable video") == 1
    list(loader)  # second epoch: the known bad file is not decoded or reported again
    assert loader.num_replaced == 2 and caplog.text.count("skipping unreadable video") == 1
    dropping = _loader(bad, shuffle=False, replace_unreadable=False, drop_last=False)
    assert [b.indices for b in dropping][1] == [2]


def test_loader_argument_errors(samples):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _loader(samples, batch_size=4, world_size=4)
    with pytest.raises(ValueError, match="rank < world_size"):
        _loader(samples, rank=2, world_size=2)
    loader = _loader(samples)
    with pytest.raises(ValueError, match="for 5 samples"):
        loader.load_state_dict({"epoch": 0, "step": 1, "num_samples": 5})
