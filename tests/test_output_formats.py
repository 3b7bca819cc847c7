"""Parquet and JSONL inputs and outputs through a kill and a resume, and side by side in one folder at once;
caption sidecars, datautil conversions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.datasets import datautil
from pipeline.datasets.metadata import MetadataError, read_metadata
from tests.colour_captioner import main as colour_main
from tests.msrun import count_lines, kill_when_written
from tests.test_runner import expected_caption, make_dataset, read_rows
from tests.video_factory import write_index_video

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "colour_captioner.py"


def typed_table(folder: Path, n: int) -> pd.DataFrame:
    """n videos with columns of several types: an id that must stay text, a float, an int, a list."""
    for i in range(n):
        write_index_video(folder / f"videos/v{i:02d}.mp4", num_frames=6 + i)
    return pd.DataFrame({
        "path": [f"videos/v{i:02d}.mp4" for i in range(n)],
        "id": [f"{i:03d}" for i in range(n)],
        "score": [i + 0.25 for i in range(n)],
        "frames": np.arange(6, 6 + n, dtype="int64"),
        "tags": [["clip", str(i)] for i in range(n)],
    })


def write_jsonl(table: pd.DataFrame, path: Path) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in table.to_dict("records")))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_typed_output_survives_kill_and_resume(tmp_path, fmt):
    n = 6
    table = typed_table(tmp_path, n)
    source = tmp_path / f"meta.{fmt}"
    if fmt == "parquet":
        table.to_parquet(source, index=False)
    else:
        write_jsonl(table, source)
    out = tmp_path / f"meta_caption.{fmt}"
    part = tmp_path / f"meta_caption.{fmt}.part0.csv"
    second_log = tmp_path / "calls2.txt"
    cmd = [sys.executable, str(SCRIPT), str(source), "--bs", "2", "--device", "CPU"]  # the default output
    kill_when_written(cmd, ROOT, dict(os.environ, CAPTION_SLEEP="0.5"), part, 3)  # header + 2 rows
    finished = read_rows(part)
    assert 2 <= len(finished) < n and not out.exists(), "the kill should land mid-run"

    subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, CAPTION_CALL_LOG=str(second_log)), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert count_lines(second_log) == n - len(finished), "finished rows must not be captioned again"
    assert not part.exists()
    if fmt == "parquet":
        types, in_types = pq.read_schema(out), pq.read_schema(source)
        assert [types.field(col).type for col in table.columns] == [in_types.field(col).type for col in table.columns]
        assert [str(types.field(col).type) for col in ("text", "status", "error")] == ["string"] * 3
        got = pd.read_parquet(out)
        rows = got.assign(tags=[list(tags) for tags in got["tags"]]).to_dict("records")
    else:
        rows = read_jsonl(out)
    assert [list(row) for row in rows] == [[*table.columns, "text", "status", "error"]] * n
    for row, expected in zip(rows, table.to_dict("records")):  # every row once, in input order
        assert {col: row[col] for col in table.columns} == expected
        assert type(row["frames"]) in (int, np.int64) and isinstance(row["id"], str)
        assert row["status"] == "ok" and row["error"] == ""
        assert row["text"] == expected_caption(tmp_path, row["path"])

    # A re-run reads the typed output back: nothing left to do, and the file keeps its types.
    before = out.read_bytes()
    summary = colour_main([str(source), "--device", "CPU"])
    assert summary.skipped == n and summary.done == 0 and out.read_bytes() == before


def test_parquet_and_jsonl_outputs_in_one_folder_run_at_once(tmp_path):
    """Outputs that differ only in format share no file: two runs at once each write their own part file
    and end with every row (they used to share out_part0.csv: one output lost rows, the other came out empty)."""
    n = 6
    csv_path = make_dataset(tmp_path, n)
    gate = tmp_path / "go"
    runs = {}
    for fmt in ("parquet", "jsonl"):
        log = tmp_path / f"calls_{fmt}.txt"
        cmd = [sys.executable, str(SCRIPT), str(csv_path), "--output", str(tmp_path / f"out.{fmt}"), "--bs", "2",
               "--device", "CPU"]
        env = dict(os.environ, CAPTION_CALL_LOG=str(log), CAPTION_HOLD=str(gate))
        runs[fmt] = log, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and any(count_lines(log) < 4 for log, _ in runs.values()):
            time.sleep(0.1)  # both in their second batch: the first one's rows are in their part files
        assert sorted(p.name for p in tmp_path.glob("out*part*")) == [
            "out.jsonl.part0.csv", "out.jsonl.part0.inflight", "out.parquet.part0.csv", "out.parquet.part0.inflight"]
        assert [len(read_rows(tmp_path / f"out.{fmt}.part0.csv")) for fmt in runs] == [2, 2]
    finally:
        gate.touch()
        stderr = {fmt: proc.communicate(timeout=120)[1] for fmt, (_, proc) in runs.items()}
    for fmt, (_, proc) in runs.items():
        assert proc.returncode == 0, stderr[fmt][-2000:]
    got = {"parquet": pd.read_parquet(tmp_path / "out.parquet").to_dict("records"),
           "jsonl": read_jsonl(tmp_path / "out.jsonl")}
    for fmt, rows in got.items():
        assert [r["path"] for r in rows] == [f"videos/v{i:02d}.mp4" for i in range(n)], fmt
        assert {r["status"] for r in rows} == {"ok"}, fmt
        assert count_lines(runs[fmt][0]) == n, f"the {fmt} run captioned every row itself"
    assert not list(tmp_path.glob("out*part*"))


def test_csv_input_to_parquet_output_keeps_text(tmp_path):
    write_index_video(tmp_path / "videos/a.mp4", num_frames=6)
    source = tmp_path / "meta.csv"
    source.write_text("path,id,score\nvideos/a.mp4,007,1.50\n")
    out = tmp_path / "out.parquet"
    colour_main([str(source), "--output", str(out), "--device", "CPU"])
    got = pd.read_parquet(out)
    assert got[["id", "score", "status"]].to_dict("records") == [{"id": "007", "score": "1.50", "status": "ok"}]
    assert read_metadata(out)["score"].tolist() == ["1.50"]


def test_sidecars_next_to_videos_and_in_a_folder(tmp_path):
    for name in ("a/clip.mp4", "b/clip.mp4", "b/long.mp4"):
        write_index_video(tmp_path / name, num_frames=20)  # 2 s at 10 fps
    source = tmp_path / "meta.csv"
    source.write_text("path,start,end\na/clip.mp4,,\nb/clip.mp4,,\nb/long.mp4,0,1\nb/long.mp4,1,\nb/gone.mp4,,\n")
    colour_main([str(source), "--device", "CPU", "--sidecar"])
    status = {(r["path"], r["start"]): r for r in read_rows(tmp_path / "meta_caption.csv")}
    assert status["b/gone.mp4", ""]["status"] == "error"
    beside = {p.relative_to(tmp_path).as_posix(): p.read_text() for p in tmp_path.rglob("*.txt")}
    assert beside == {
        "a/clip.txt": status["a/clip.mp4", ""]["text"] + "\n",
        "b/clip.txt": status["b/clip.mp4", ""]["text"] + "\n",
        "b/long_0-1.txt": status["b/long.mp4", "0"]["text"] + "\n",
        "b/long_1-end.txt": status["b/long.mp4", "1"]["text"] + "\n",
    }, "one sidecar per ok row, none for the error row"

    folder = tmp_path / "captions"
    colour_main([str(source), "--device", "CPU", "--sidecar_dir", str(folder)])
    assert sorted(p.name for p in folder.iterdir()) == ["a__clip.txt", "b__clip.txt", "long_0-1.txt",
                                                        "long_1-end.txt"]
    assert (folder / "b__clip.txt").read_text() == beside["b/clip.txt"]

    # A re-run rewrites only sidecars whose caption changed.
    (folder / "a__clip.txt").write_text("stale\n")
    untouched = (folder / "b__clip.txt").stat().st_mtime_ns
    os.utime(folder / "b__clip.txt", ns=(untouched - 10**9, untouched - 10**9))
    colour_main([str(source), "--device", "CPU", "--sidecar_dir", str(folder)])
    assert (folder / "a__clip.txt").read_text() == beside["a/clip.txt"]
    assert (folder / "b__clip.txt").stat().st_mtime_ns == untouched - 10**9
    assert not list(folder.glob(".*.tmp"))


def test_datautil_round_trip_csv_parquet_jsonl_csv(tmp_path, capsys):
    source = tmp_path / "meta.csv"
    source.write_text('path,id,text,status\na.mp4,007,"a red, round\nball",ok\nb.mp4,010,,error\n')
    steps = [tmp_path / "t.parquet", tmp_path / "t.jsonl", tmp_path / "back.csv"]
    for src, dst in zip([source, *steps], steps):
        assert datautil.main([str(src), "--output", str(dst)]) == 0
        assert f"wrote 2 rows to {dst}" in capsys.readouterr().out
    assert steps[2].read_bytes() == read_metadata(source).to_csv(index=False, lineterminator="\r\n").encode()
    assert read_metadata(steps[2]).equals(read_metadata(source))
    assert pd.read_parquet(steps[0])["id"].tolist() == ["007", "010"]


def test_datautil_parquet_to_jsonl_keeps_types(tmp_path):
    table = pd.DataFrame({"path": ["a.mp4", "b.mp4"], "n": pd.array([3, None], dtype="Int64"),
                          "score": [0.5, 2.0], "keep": [True, False]})
    table.to_parquet(tmp_path / "t.parquet", index=False)
    assert datautil.main([str(tmp_path / "t.parquet"), "--output", str(tmp_path / "t.jsonl")]) == 0
    assert read_jsonl(tmp_path / "t.jsonl") == [{"path": "a.mp4", "n": 3, "score": 0.5, "keep": True},
                                                {"path": "b.mp4", "n": None, "score": 2.0, "keep": False}]
    assert datautil.main([str(tmp_path / "t.jsonl"), "--output", str(tmp_path / "u.parquet")]) == 0
    back = pd.read_parquet(tmp_path / "u.parquet", dtype_backend="numpy_nullable")
    assert back.equals(table.astype({"score": "Float64", "keep": "boolean", "path": "string"}))


def test_bad_jsonl_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.mp4"}\n[1, 2]\n')
    with pytest.raises(MetadataError, match="line 2 is a JSON list"):
        read_metadata(bad)
    bad.write_text('{"path": "a.mp4"}\n{"path": \n')
    with pytest.raises(MetadataError, match="line 2 is not valid JSON"):
        read_metadata(bad)
    bad.write_text('{"video": "a.mp4"}\n')
    with pytest.raises(MetadataError, match="missing required column"):
        read_metadata(bad)
    bad.write_text("")
    assert len(read_metadata(bad)) == 0 and list(read_metadata(bad).columns) == ["path"]
