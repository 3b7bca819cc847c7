"""The synthetic caption dataset: clips show what their captions say, splits are disjoint."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.datasets import synthetic
from pipeline.datasets.synthetic import BACKGROUNDS, COLOURS, Clip, captions, generate, render
from pipeline.datasets.video import sample_frames


def shape_pixels(frame: np.ndarray, clip: Clip) -> np.ndarray:
    """(row, col) of pixels that differ from the background."""
    diff = np.abs(frame.astype(int) - np.array(BACKGROUNDS[clip.background])).sum(axis=-1)
    return np.argwhere(diff > 60)


def test_actions_are_visible_across_frames():
    rng = np.random.default_rng(1)
    for action, check in [
        ("right", lambda first, last: last[:, 1].mean() > first[:, 1].mean() + 20),
        ("left", lambda first, last: last[:, 1].mean() < first[:, 1].mean() - 20),
        ("down", lambda first, last: last[:, 0].mean() > first[:, 0].mean() + 20),
        ("up", lambda first, last: last[:, 0].mean() < first[:, 0].mean() - 20),
        ("grows", lambda first, last: len(last) > 2 * len(first)),
        ("shrinks", lambda first, last: len(first) > 2 * len(last)),
        ("appears", lambda first, last: len(first) == 0 and len(last) > 0),
        ("still", lambda first, last: abs(len(first) - len(last)) < 5),
    ]:
        clip = Clip("red", "square", action, "blue", background=0)
        frames = render(clip, num_frames=16, size=96, rng=rng)
        assert check(shape_pixels(frames[0], clip), shape_pixels(frames[-1], clip)), action


def test_recolour_changes_the_shape_colour():
    clip = Clip("red", "circle", "recolour", "blue", background=0)
    frames = render(clip, rng=np.random.default_rng(0))
    first, last = (frames[i][tuple(shape_pixels(frames[i], clip).T)].mean(axis=0) for i in (0, -1))
    assert np.abs(first - COLOURS["red"]).sum() < 60 and np.abs(last - COLOURS["blue"]).sum() < 60


def test_captions_name_colour_shape_and_differ():
    texts = captions(Clip("orange", "triangle", "left", "red", 1), np.random.default_rng(0))
    assert len(set(texts)) == 5
    assert all("orange" in t and "triangle" in t for t in texts)
    assert not any("a orange" in t for t in texts)


def test_generated_dataset_splits_and_videos(tmp_path):
    written = generate(tmp_path, num_videos=10, seed=3, num_frames=8, size=64)
    tables = {k: pd.read_csv(v, dtype=str) for k, v in written.items()}
    ids = [set(t["video_id"]) for t in tables.values()]
    assert sum(len(i) for i in ids) == 10 and not (ids[0] & ids[1]) and not (ids[0] & ids[2])
    assert all((t.groupby("path").size() == 5).all() for t in tables.values())
    frames, indices = sample_frames(str(tmp_path / tables["train"]["path"].iloc[0]), num_frames=8)
    assert frames.shape == (8, 64, 64, 3) and list(indices) == list(range(8))
    again = generate(tmp_path / "again", num_videos=10, seed=3, num_frames=8, size=64)
    assert pd.read_csv(again["train"])["text"].tolist() == tables["train"]["text"].tolist()


def test_every_generated_caption_reads_back_to_its_clip():
    from pipeline.training.synthetic_accuracy import read_caption

    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(400):
        clip = synthetic.random_clip(rng)
        for text in synthetic.captions(clip, rng, count=6):
            assert read_caption(text) == (clip.colour, clip.shape, clip.action), text
            seen.add(clip.action)
    assert seen == set(synthetic.ACTIONS)


def test_accuracy_counts_each_attribute_and_motion(tmp_path):
    from pipeline.training import synthetic_accuracy

    refs = pd.DataFrame({"video_id": ["a", "a", "b", "c"],
                         "text": ["a red circle moves to the left", "the red circle slides to the left",
                                  "a blue square grows", "a green triangle stays still"],
                         "path": ["videos/a.mp4", "videos/a.mp4", "videos/b.mp4", "videos/c.mp4"]})
    preds = pd.DataFrame({"path": ["videos/a.mp4", "videos/b.mp4", "videos/c.mp4"],
                          "text": ["a red square moves to the right", "a blue square gets bigger", "oops"],
                          "status": ["ok", "ok", "error"]})
    refs.to_csv(tmp_path / "test.csv", index=False)
    preds.to_csv(tmp_path / "pred.csv", index=False)
    result = synthetic_accuracy.main(["--references", str(tmp_path / "test.csv"),
                                      "--predictions", str(tmp_path / "pred.csv")])
    assert result["num_videos"] == 2  # the error row is not scored
    assert (result["colour"], result["shape"], result["action"], result["motion"]) == (1.0, 0.5, 0.5, 0.5)
    assert result["per_action"]["left"] == {"videos": 1, "right": 0.0}
