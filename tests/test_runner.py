"""The captioning runner: outputs, resume, errors, crash safety and msrun sharding."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.captioning.runner import rows_to_do, shard
from pipeline.datasets.metadata import Progress
from pipeline.datasets.video import sample_frames
from tests.msrun import count_lines, kill_when_written, run_msrun
from tests.colour_captioner import colour_caption, main as colour_main
from tests.video_factory import write_corrupt, write_empty, write_index_video

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "colour_captioner.py"


def make_dataset(folder: Path, n: int, bad: dict[int, str] | None = None) -> Path:
    """n videos (relative paths) with extra columns that must survive untouched."""
    bad = bad or {}
    rows = []
    for i in range(n):
        name = f"videos/v{i:02d}.mp4"
        if bad.get(i) == "missing":
            pass
        elif bad.get(i) == "empty":
            write_empty(folder / name)
        elif bad.get(i) == "corrupt":
            write_corrupt(folder / name, seed=i)
        else:
            write_index_video(folder / name, num_frames=6 + i, codec="h264")
        rows.append({"path": name, "id": f"{i:03d}", "note": f"clip, number {i}", "score": "1.50"})
    csv_path = folder / "meta.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    return csv_path


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def expected_caption(folder: Path, rel: str) -> str:
    frames, _ = sample_frames(str(folder / rel), num_frames=4)
    return colour_caption(frames)


def test_shard_is_disjoint_and_complete():
    rows = pd.DataFrame({"path": [f"p{i}" for i in range(11)]})
    shards = [shard(rows, r, 3) for r in range(3)]
    got = sorted(p for s in shards for p in s["path"])
    assert got == sorted(rows["path"])
    assert sum(len(s) for s in shards) == 11
    assert [len(s) for s in shards] == [4, 4, 3]


def test_rows_to_do_respects_status():
    data = pd.DataFrame({"path": ["a", "b", "c", "d"]})
    progress = Progress(table=pd.DataFrame(), done=frozenset({"a"}), failed=frozenset({"b"}))
    assert list(rows_to_do(data, progress, retry_errors=False)["path"]) == ["c", "d"]
    assert list(rows_to_do(data, progress, retry_errors=True)["path"]) == ["b", "c", "d"]


def test_captions_every_row_and_keeps_columns(tmp_path):
    csv_path = make_dataset(tmp_path, 5)
    summary = colour_main([str(csv_path), "--bs", "2", "--device", "CPU"])
    out = tmp_path / "meta_caption.csv"
    assert summary.output == out
    rows = read_rows(out)
    assert [r["path"] for r in rows] == [f"videos/v{i:02d}.mp4" for i in range(5)]
    assert list(rows[0]) == ["path", "id", "note", "score", "text", "status", "error"]
    for i, row in enumerate(rows):
        assert row["id"] == f"{i:03d}" and row["note"] == f"clip, number {i}" and row["score"] == "1.50"
        assert row["status"] == "ok" and row["error"] == ""
        assert row["text"] == expected_caption(tmp_path, row["path"])
    assert not list(tmp_path.glob("meta_caption.csv.part*.csv")), "part files are merged away"


def test_bad_videos_become_error_rows(tmp_path):
    csv_path = make_dataset(tmp_path, 6, bad={1: "missing", 2: "empty", 4: "corrupt"})
    out = tmp_path / "out.csv"
    summary = colour_main([str(csv_path), "--output", str(out), "--bs", "4", "--device", "CPU"])
    rows = {r["path"]: r for r in read_rows(out)}
    assert len(rows) == 6 and summary.failed == 3 and summary.done == 3
    for i in (1, 2, 4):
        row = rows[f"videos/v{i:02d}.mp4"]
        assert row["status"] == "error" and row["text"] == ""
        assert f"v{i:02d}.mp4" in row["error"]
    for i in (0, 3, 5):
        assert rows[f"videos/v{i:02d}.mp4"]["status"] == "ok"


def test_model_failure_costs_only_its_row(tmp_path):
    csv_path = make_dataset(tmp_path, 4)
    bad_caption = expected_caption(tmp_path, "videos/v02.mp4")
    out = tmp_path / "out.csv"
    colour_main([str(csv_path), "--output", str(out), "--bs", "4", "--device", "CPU", "--fail_on", bad_caption])
    rows = read_rows(out)
    failing = [expected_caption(tmp_path, r["path"]) == bad_caption for r in rows]
    assert 1 <= sum(failing) < len(rows)
    assert [r["status"] for r in rows] == ["error" if f else "ok" for f in failing]
    assert all("model failure" in r["error"] for r, f in zip(rows, failing) if f)


def test_resume_retry_errors_and_overwrite(tmp_path, monkeypatch):
    csv_path = make_dataset(tmp_path, 4, bad={3: "corrupt"})
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("CAPTION_CALL_LOG", str(log))
    args = [str(csv_path), "--bs", "2", "--device", "CPU"]
    colour_main(args)
    assert count_lines(log) == 3

    # New rows appended to the CSV: only they are captioned; the error row is left alone.
    data = pd.read_csv(csv_path, dtype=str)
    write_index_video(tmp_path / "videos/new.mp4", num_frames=20)
    data.loc[len(data)] = {"path": "videos/new.mp4", "id": "100", "note": "new", "score": "2"}
    data.to_csv(csv_path, index=False)
    log.unlink()
    summary = colour_main(args)
    assert count_lines(log) == 1 and summary.skipped == 4

    # The broken video is replaced: --retry_errors redoes that row only.
    write_index_video(tmp_path / "videos/v03.mp4", num_frames=9)
    log.unlink()
    colour_main(args + ["--retry_errors"])
    assert log.read_text().splitlines() == [expected_caption(tmp_path, "videos/v03.mp4")]
    rows = read_rows(tmp_path / "meta_caption.csv")
    assert len(rows) == 5 and all(r["status"] == "ok" for r in rows)

    log.unlink()
    colour_main(args + ["--overwrite"])
    assert count_lines(log) == 5
    assert len(read_rows(tmp_path / "meta_caption.csv")) == 5


def test_bad_csv_fails_clearly(tmp_path, capsys):
    no_path = tmp_path / "nopath.csv"
    no_path.write_text("video,caption\na.mp4,x\n")
    with pytest.raises(SystemExit) as err:
        colour_main([str(no_path), "--device", "CPU"])
    assert "nopath.csv" in str(err.value) and "path" in str(err.value)

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(SystemExit) as err:
        colour_main([str(empty), "--device", "CPU"])
    assert "empty.csv" in str(err.value)

    header_only = tmp_path / "header.csv"
    header_only.write_text("path,id\n")
    summary = colour_main([str(header_only), "--device", "CPU"])
    assert summary.done == 0 and read_rows(tmp_path / "header_caption.csv") == []


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update(extra)
    return env


def test_kill_and_resume_loses_nothing(tmp_path):
    n = 12
    csv_path = make_dataset(tmp_path, n)
    out = tmp_path / "meta_caption.csv"
    part = tmp_path / "meta_caption.csv.part0.csv"
    first_log, second_log = tmp_path / "calls1.txt", tmp_path / "calls2.txt"
    cmd = [sys.executable, str(SCRIPT), str(csv_path), "--bs", "2", "--device", "CPU"]
    kill_when_written(cmd, ROOT, _env(CAPTION_CALL_LOG=str(first_log), CAPTION_SLEEP="0.5"), part, 5)  # header + 4 rows
    finished = read_rows(part)
    assert 4 <= len(finished) < n, "the kill should land mid-run"
    assert not out.exists()

    subprocess.run(cmd, cwd=ROOT, env=_env(CAPTION_CALL_LOG=str(second_log)), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(f"videos/v{i:02d}.mp4" for i in range(n))
    assert all(r["status"] == "ok" for r in rows)
    assert count_lines(second_log) == n - len(finished), "finished rows must not be captioned again"


def test_parts_named_by_an_earlier_version_resume_the_csv_output_only(tmp_path, monkeypatch, caplog):
    """Earlier versions named part files after the output's stem for CSV, Parquet and JSONL outputs alike
    (meta_caption_part0.csv): a run interrupted so still resumes its CSV output; a Parquet output leaves the
    part alone, saying how to take it."""
    n = 4
    csv_path = make_dataset(tmp_path, n)
    colour_main([str(csv_path), "--device", "CPU", "--output", str(tmp_path / "whole.csv")])
    whole = (tmp_path / "whole.csv").read_text()
    old = tmp_path / "meta_caption_part0.csv"
    lines = whole.splitlines(keepends=True)
    old.write_text("".join(lines[:3]) + lines[3][:10])  # the header, two rows and the start of a third
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("CAPTION_CALL_LOG", str(log))

    parquet = colour_main([str(csv_path), "--device", "CPU", "--output", str(tmp_path / "meta_caption.parquet")])
    assert parquet.skipped == 0 and count_lines(log) == n
    assert old.read_text() == "".join(lines[:3]) + lines[3][:10]
    assert "meta_caption_part0.csv: not resumed" in caplog.text and "meta_caption.parquet.part<N>.csv" in caplog.text

    log.unlink()
    summary = colour_main([str(csv_path), "--device", "CPU"])
    assert summary.skipped == 2 and count_lines(log) == 2, "the two rows in the old part are not captioned again"
    assert (tmp_path / "meta_caption.csv").read_text() == whole
    assert not old.exists()


def test_msrun_two_workers_merge_every_row_once(tmp_path):
    n = 7
    csv_path = make_dataset(tmp_path, n, bad={5: "corrupt"})
    # Rank 1 finishes 40 s after rank 0: past the ~30 s at which a CPU collective would time out.
    os.environ.update(CAPTION_SLEEP="40", CAPTION_SLEEP_RANK="1")
    try:
        result = run_msrun(SCRIPT, [str(csv_path), "--bs", "2", "--device", "CPU"], cwd=tmp_path)
    finally:
        del os.environ["CAPTION_SLEEP"], os.environ["CAPTION_SLEEP_RANK"]
    assert result.returncode == 0, result.problems
    rows = read_rows(tmp_path / "meta_caption.csv")
    assert sorted(r["path"] for r in rows) == sorted(f"videos/v{i:02d}.mp4" for i in range(n))
    assert list(rows[0]) == ["path", "id", "note", "score", "text", "status", "error"]
    for row in rows:
        i = int(row["id"])
        assert row["note"] == f"clip, number {i}"
        assert row["status"] == ("error" if i == 5 else "ok")
    assert "rank 1 of 2" in result.logs, "both ranks must have joined"
    assert not list(tmp_path.glob("meta_caption.csv.part*.csv"))


def test_carriage_returns_and_reserved_names_survive_resume(tmp_path, monkeypatch):
    csv_path = make_dataset(tmp_path, 3)
    data = pd.read_csv(csv_path, dtype=str)
    data["note"] = ["old\rmac", "line\nbreak", "plain"]
    data["_row"] = ["keep", "these", "values"]
    data.to_csv(csv_path, index=False, lineterminator="\r\n")  # a valid CSV quotes the lone \r
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("CAPTION_CALL_LOG", str(log))
    colour_main([str(csv_path), "--device", "CPU"])
    colour_main([str(csv_path), "--device", "CPU"])
    assert count_lines(log) == 3, "a re-run must find every row done"
    out = pd.read_csv(tmp_path / "meta_caption.csv", dtype=str, keep_default_na=False)
    assert out["note"].tolist() == ["old\rmac", "line\nbreak", "plain"]
    assert out["_row"].tolist() == ["keep", "these", "values"]


def test_bad_settings_fail_before_any_row(tmp_path):
    csv_path = make_dataset(tmp_path, 2)
    for flags, word in ((["--bs", "0"], "--bs"), (["--num_frames", "-1"], "frame")):
        with pytest.raises(SystemExit) as err:
            colour_main([str(csv_path), "--device", "CPU", *flags])
        assert word in str(err.value)
    assert not (tmp_path / "meta_caption.csv").exists()


def test_all_rows_failing_exits_nonzero_with_hint(tmp_path, capsys):
    csv_path = make_dataset(tmp_path, 2)
    wrong_root = ["--video_root", str(tmp_path / "wrong")]
    with pytest.raises(SystemExit) as err:
        colour_main([str(csv_path), "--device", "CPU", *wrong_root])
    assert "all 2 rows this run tried failed" in str(err.value) and "re-run with --retry_errors" in str(err.value)
    # Retrying rows that are still bad says the cause remains, not to retry again.
    with pytest.raises(SystemExit) as err:
        colour_main([str(csv_path), "--device", "CPU", *wrong_root, "--retry_errors"])
    assert "failed again with --retry_errors" in str(err.value)
    # A plain re-run after fixing the root has nothing to do but says the error rows remain.
    capsys.readouterr()
    colour_main([str(csv_path), "--device", "CPU"])
    printed = capsys.readouterr().out
    assert "nothing to caption" in printed and "2 rows of meta_caption.csv are error rows" in printed
    colour_main([str(csv_path), "--device", "CPU", "--retry_errors"])
    assert "error rows" not in capsys.readouterr().out
    assert {r["status"] for r in read_rows(tmp_path / "meta_caption.csv")} == {"ok"}


def test_interrupted_overwrite_resumes_and_keeps_old_rows(tmp_path, monkeypatch):
    csv_path = make_dataset(tmp_path, 6)
    out = tmp_path / "meta_caption.csv"
    colour_main([str(csv_path), "--device", "CPU"])
    old = read_rows(out)
    # An --overwrite run killed after its first batch: the old output is set aside, not lost.
    cmd = [sys.executable, str(SCRIPT), str(csv_path), "--bs", "2", "--device", "CPU", "--overwrite"]
    part = tmp_path / "meta_caption.csv.part0.csv"
    kill_when_written(cmd, ROOT, _env(CAPTION_SLEEP="0.5"), part, 3)
    assert not out.exists() and (tmp_path / "meta_caption.prev.csv").exists()
    redone = {r["path"] for r in read_rows(part)}
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("CAPTION_CALL_LOG", str(log))
    colour_main([str(csv_path), "--device", "CPU"])  # a plain re-run resumes the overwrite
    assert count_lines(log) == 6 - len(redone)
    assert read_rows(out) == old and not (tmp_path / "meta_caption.prev.csv").exists()
