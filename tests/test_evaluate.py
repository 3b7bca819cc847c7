"""The evaluate command against pycocoevalcap's scorers called directly (needs Java)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

# Imported at collection so mindspore loads before any test imports decord: the other
# order aborts the process ("random_device could not be read").
from pipeline.captioning import caption_blip2
from pipeline.training import evaluate

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")

REFERENCES = {
    "video0": ["A man is playing a guitar.", "Someone plays the guitar on stage.", "a man plays music"],
    "video1": ["A woman is cooking pasta in a kitchen.", "a lady cooks food", "Someone is making dinner."],
    "video2": ["Two dogs run in the park.", "dogs are running on grass", "two puppies play outside",
               "Dogs chase each other."],
    "video3": ["A car drives down a road.", "a red car is driving", "traffic on a highway"],
    "video4": ["Kids play soccer.", "children are playing football on a field", "a soccer game"],
}
PREDICTIONS = {"video0": "a man is playing the guitar", "video1": "a woman is cooking in the kitchen",
               "video2": "two dogs are running in a park", "video3": "a car is driving on the road"}


def _java_children() -> list[int]:
    """Live java processes whose parent is this test process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if name == "java" and int(rest[1]) == os.getpid() and rest[0] != "Z":
            found.append(int(entry.name))
    return found


def _direct_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """pycocoevalcap used as its own example does: PTBTokenizer, then each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in references[k]] for k in predictions})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in predictions.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    scores = {f"Bleu_{i + 1}": b for i, b in enumerate(bleu)}
    scores["METEOR"] = meteor.compute_score(gts, res)[0]
    del meteor  # its __del__ ends the Java process
    scores["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    scores["CIDEr"] = Cider().compute_score(gts, res)[0]
    return scores


@pytest.fixture(scope="module")
def expected() -> dict[str, float]:
    return _direct_scores(PREDICTIONS, REFERENCES)


@pytest.fixture
def references_file(tmp_path) -> Path:
    """MSR-VTT style annotations, with one more video in another split."""
    data = {"videos": [{"video_id": v, "split": "test"} for v in REFERENCES] + [{"video_id": "x", "split": "train"}],
            "sentences": [{"video_id": v, "caption": c} for v, caps in REFERENCES.items() for c in caps]
            + [{"video_id": "x", "caption": "not scored"}]}
    path = tmp_path / "videodatainfo.json"
    path.write_text(json.dumps(data))
    return path


def test_command_equals_pycocoevalcap_direct(tmp_path, references_file, expected, caplog, capsys):
    # The captioning runner's output: raw path values, a status column, one failed row.
    rows = [{"path": f"clips/{v}.mp4", "text": t, "status": "ok", "error": ""} for v, t in PREDICTIONS.items()]
    rows.append({"path": "clips/video4.mp4", "text": "", "status": "error", "error": "VideoReadError"})
    pd.DataFrame(rows).to_csv(tmp_path / "pred.csv", index=False)
    out = tmp_path / "scores.json"
    before = _java_children()
    with caplog.at_level(logging.INFO):
        scores = evaluate.main(["--references", str(references_file), "--split", "test",
                                "--video_root", str(tmp_path / "clips"), "--predictions", str(tmp_path / "pred.csv"),
                                "--output_json", str(out)])
    assert _java_children() == before  # METEOR's Java process was ended
    assert list(scores) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, abs=1e-12), name
    saved = json.loads(out.read_text())
    assert saved["scores"] == scores and saved["num_videos"] == 4 and saved["num_reference_videos"] == 5
    table = capsys.readouterr().out
    assert f"CIDEr{expected['CIDEr']:>15.4f}" in table
    assert "1 prediction rows have status other than ok" in caplog.text
    assert "scoring 4 of 5 reference videos" in caplog.text
    if not evaluate.spice_available():
        assert caplog.text.count("SPICE skipped") == 1


def test_caption_mode_runs_the_captioner_then_scores(tmp_path, references_file, monkeypatch):
    """--checkpoint writes the split's videos, calls caption_blip2.main (resumable), matches by video_id."""
    calls = []

    def fake_caption(argv):
        calls.append(argv)
        videos = pd.read_csv(argv[0], dtype=str)
        output = argv[argv.index("--output") + 1]
        videos.assign(text=[PREDICTIONS.get(v, "a video") for v in videos["video_id"]], status="ok",
                      error="").to_csv(output, index=False)

    scored = {}
    monkeypatch.setattr(caption_blip2, "main", fake_caption)
    monkeypatch.setattr(evaluate, "score_captions", lambda p, r, spice=None: scored.update(p=p, r=r) or {"CIDEr": 1.0})
    pred = tmp_path / "out" / "pred.csv"
    evaluate.main(["--references", str(references_file), "--split", "test", "--video_root", str(tmp_path),
                   "--predictions", str(pred), "--checkpoint", "/models/ckpt", "--num_frames", "8", "--device", "CPU"])
    (argv,) = calls
    assert argv[1:] == ["--output", str(pred), "--pretrained_model_name_or_path", "/models/ckpt",
                        "--num_frames", "8", "--device", "CPU"]
    assert list(pd.read_csv(argv[0])["video_id"]) == list(REFERENCES)
    assert scored["p"] == {**PREDICTIONS, "video4": "a video"}
    assert scored["r"] == REFERENCES


def test_match_by_video_id_path_and_stem(tmp_path):
    from pipeline.datasets.captions import CaptionRecord

    records = [CaptionRecord("a", str(tmp_path / "v" / "a.mp4"), ("x",)), CaptionRecord("b.mp4", "/else/b.mp4", ("y",)),
               CaptionRecord("c", "/data/c.avi", ("z",))]
    by_path = pd.DataFrame({"path": ["v/a.mp4", "b.mp4", "other/c.webm", "unknown.mp4"], "text": ["1", "2", "3", "4"]})
    assert evaluate.match_predictions(by_path, records, tmp_path) == {"a": "1", "b.mp4": "2", "c": "3"}
    by_id = pd.DataFrame({"video_id": ["c", "a"], "text": ["3", "1"]})
    assert evaluate.match_predictions(by_id, records, tmp_path) == {"c": "3", "a": "1"}


def test_errors(tmp_path, references_file):
    with pytest.raises(ValueError, match="have no references"):
        evaluate.score_captions({"nope": "a caption"}, {"video0": ["a"]})
    with pytest.raises(SystemExit, match="annotation file not found"):
        evaluate.main(["--references", str(tmp_path / "missing.json"), "--predictions", "p.csv"])
    (tmp_path / "p.csv").write_text("path,text\nelsewhere.mp4,a caption\n")
    with pytest.raises(SystemExit, match="no prediction in .* matches a video"):
        evaluate.main(["--references", str(references_file), "--predictions", str(tmp_path / "p.csv")])
    with pytest.raises(SystemExit):
        evaluate.main(["--references", str(references_file), "--predictions", "p.csv", "--num_frames", "8"])
