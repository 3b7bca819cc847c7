"""Behaviour of the CSV metadata layer and the datautil command line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.datasets import metadata
from pipeline.datasets.metadata import (
    MetadataError,
    difference,
    find_part_files,
    finalize_output,
    intersection,
    merge_csvs,
    merge_tables,
    part_path,
    read_metadata,
    read_progress,
    remove_empty_caption,
    resolve_video_path,
    row_keys,
    source_keys,
    split_timestamps,
    trim_incomplete_record,
    write_csv_atomic,
)

HEADER = "path,id,text,status,error\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def rows(df: pd.DataFrame) -> list[dict]:
    return df.to_dict("records")


# ---------------------------------------------------------------- read_metadata


def test_missing_path_column_names_file_and_columns(tmp_path):
    csv = write(tmp_path / "meta.csv", "video,caption\na.mp4,x\n")
    with pytest.raises(MetadataError) as err:
        read_metadata(csv)
    message = str(err.value)
    assert str(csv) in message
    assert "'path'" in message and "'video'" in message and "'caption'" in message


def test_zero_byte_file_is_an_error(tmp_path):
    csv = write(tmp_path / "empty.csv", "")
    with pytest.raises(MetadataError, match="empty.csv.*0 bytes"):
        read_metadata(csv)


def test_header_only_file_is_an_empty_table(tmp_path):
    df = read_metadata(write(tmp_path / "h.csv", "path,id\n"))
    assert len(df) == 0 and list(df.columns) == ["path", "id"]


def test_missing_file(tmp_path):
    with pytest.raises(MetadataError, match="nope.csv: file not found"):
        read_metadata(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    "text, problem",
    [
        ('path,a\n"x.mp4,1\n', "not a valid CSV"),
        ("path,a\nx.mp4,1,2\n", "not a valid CSV"),
        ("path,a\ny.mp4,1\nx.mp4,1,2\n", "not a valid CSV"),
        ("path,a\n,1\n", "empty 'path'"),
        ("\n\n", "no header"),
    ],
)
def test_unusable_csv_is_reported(tmp_path, text, problem):
    csv = write(tmp_path / "bad.csv", text)
    with pytest.raises(MetadataError, match=problem) as err:
        read_metadata(csv)
    assert str(csv) in str(err.value)


def test_duplicate_paths_warn_but_do_not_fail(tmp_path, caplog):
    csv = write(tmp_path / "dup.csv", "path\na.mp4\nb.mp4\na.mp4\na.mp4\n")
    with caplog.at_level(logging.WARNING, logger="pipeline.datasets.metadata"):
        df = read_metadata(csv)
    assert len(df) == 4
    (record,) = caplog.records
    assert str(csv) in record.message and "2 duplicate" in record.message and "a.mp4" in record.message


def test_other_columns_keep_exact_strings_through_merge_and_write(tmp_path):
    csv = write(tmp_path / "m.csv", 'path,id,score,note,flag\na.mp4,007,1.50,,NA\nb.mp4,010,2,"x, y",True\n')
    df = read_metadata(csv)
    expected = [
        {"path": "a.mp4", "id": "007", "score": "1.50", "note": "", "flag": "NA"},
        {"path": "b.mp4", "id": "010", "score": "2", "note": "x, y", "flag": "True"},
    ]
    assert rows(df) == expected
    out = tmp_path / "out.csv"
    merge_csvs([csv], out)
    assert rows(read_metadata(out)) == expected


def test_bom_and_short_rows(tmp_path):
    csv = tmp_path / "bom.csv"
    csv.write_bytes("\ufeffpath,id\na.mp4\n".encode("utf-8"))
    assert rows(read_metadata(csv)) == [{"path": "a.mp4", "id": ""}]


# ---------------------------------------------------------------- paths


def test_resolve_video_path(tmp_path):
    csv_dir = tmp_path / "lists"
    assert resolve_video_path("/data/v.mp4", csv_dir) == "/data/v.mp4"
    assert resolve_video_path("/data/v.mp4", csv_dir, "/root") == "/data/v.mp4"
    assert resolve_video_path("sub/v.mp4", csv_dir) == str(csv_dir / "sub" / "v.mp4")
    assert resolve_video_path("sub/v.mp4", csv_dir, tmp_path / "videos") == str(tmp_path / "videos" / "sub" / "v.mp4")


def test_part_files_naming_and_discovery(tmp_path):
    out = tmp_path / "run" / "out.csv"
    assert part_path(out, 3) == tmp_path / "run" / "out.csv.part3.csv"
    assert part_path(out.with_suffix(".parquet"), 0) == tmp_path / "run" / "out.parquet.part0.csv"
    with pytest.raises(ValueError):
        part_path(out, -1)
    assert find_part_files(out) == []
    out.parent.mkdir()
    names = ["out.csv.part10.csv", "out.csv.part2.csv", "out.csv.part0.csv", "out.csv.partx.csv", "out.csv.part1.tsv"]
    names += ["other.csv.part1.csv", "out.csv.part0.csv.part1.csv", "out.csv", "out.parquet.part1.csv"]
    names += ["out.jsonl.part3.csv", "out_part4.csv", "out_part1.csv"]  # the last two: named by an earlier version
    for name in names:
        write(out.parent / name, "path\n")
    # a CSV output also takes the parts an earlier version named after its stem, ahead of its own
    assert [p.name for p in find_part_files(out)] == ["out_part1.csv", "out_part4.csv", "out.csv.part0.csv",
                                                      "out.csv.part2.csv", "out.csv.part10.csv"]
    assert [p.name for p in find_part_files(out.with_suffix(".parquet"))] == ["out.parquet.part1.csv"]
    assert [p.name for p in find_part_files(out.with_suffix(".jsonl"))] == ["out.jsonl.part3.csv"]


# ---------------------------------------------------------------- atomic write


def test_atomic_write_creates_dirs_and_leaves_no_temp(tmp_path):
    out = tmp_path / "a" / "b" / "out.csv"
    write_csv_atomic(pd.DataFrame({"path": ["x.mp4"], "id": ["007"]}), out)
    assert out.read_text() == "path,id\nx.mp4,007\n"
    assert os.listdir(out.parent) == ["out.csv"]


def test_failed_write_keeps_old_output_and_no_temp(tmp_path, monkeypatch):
    out = write(tmp_path / "out.csv", "path\nold.mp4\n")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(metadata.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_csv_atomic(pd.DataFrame({"path": ["new.mp4"]}), out)
    assert out.read_text() == "path\nold.mp4\n"
    assert os.listdir(tmp_path) == ["out.csv"]


# ---------------------------------------------------------------- merge


def result_tables():
    part0 = pd.DataFrame(
        [["b.mp4", "2", "", "error", "oom"], ["a.mp4", "1", "a first", "ok", ""], ["b.mp4", "2", "b ok", "ok", ""]],
        columns=["path", "id", "text", "status", "error"],
    )
    part1 = pd.DataFrame(
        [
            ["c.mp4", "3", "", "error", "bad file"],
            ["a.mp4", "1", "a second", "ok", ""],
            ["b.mp4", "2", "", "error", "late"],
        ],
        columns=["path", "id", "text", "status", "error"],
    )
    return part0, part1


def test_merge_keeps_last_ok_row_in_first_seen_order():
    merged = merge_tables(list(result_tables()))
    assert rows(merged) == [
        {"path": "b.mp4", "id": "2", "text": "b ok", "status": "ok", "error": ""},
        {"path": "a.mp4", "id": "1", "text": "a second", "status": "ok", "error": ""},
        {"path": "c.mp4", "id": "3", "text": "", "status": "error", "error": "bad file"},
    ]


def test_merge_without_status_keeps_last_row_and_unions_columns():
    left = pd.DataFrame({"path": ["a", "b"], "x": ["1", "2"]})
    right = pd.DataFrame({"path": ["a"], "y": ["9"]})
    assert rows(merge_tables([left, right])) == [
        {"path": "a", "x": "", "y": "9"},
        {"path": "b", "x": "2", "y": ""},
    ]
    empty = merge_tables([pd.DataFrame(columns=["path", "q"])])
    assert len(empty) == 0 and list(empty.columns) == ["path", "q"]


def test_merge_is_idempotent():
    part0, part1 = result_tables()
    once = merge_tables([part0, part1])
    assert merge_tables([once, part0, part1]).equals(once)
    assert merge_tables([once]).equals(once)


def test_merge_csvs_removes_inputs_only_after_writing(tmp_path):
    part0, part1 = result_tables()
    out = tmp_path / "out.csv"
    write_csv_atomic(part0, part_path(out, 0))
    write_csv_atomic(part1, part_path(out, 1))
    merged = merge_csvs(find_part_files(out), out, remove_inputs=True)
    assert sorted(os.listdir(tmp_path)) == ["out.csv"]
    assert read_metadata(out).equals(merged)
    assert len(merged) == 3


# ---------------------------------------------------------------- resume support


def test_read_progress_and_finalize(tmp_path):
    out = tmp_path / "out.csv"
    columns = ["path", "id", "text", "status", "error"]
    write_csv_atomic(pd.DataFrame([["d.mp4", "4", "d", "ok", ""]], columns=columns), out)
    part0, part1 = result_tables()
    write_csv_atomic(part0, part_path(out, 0))
    # rank 1 crashed in the middle of a multi-line caption
    text = part1.to_csv(index=False) + 'e.mp4,5,"first line\nsecond'
    write(part_path(out, 1), text)
    write(part_path(out, 2), "")  # rank 2 died before writing its header

    progress = read_progress(out)
    assert progress.done == {"a.mp4", "b.mp4", "d.mp4"}
    assert progress.failed == {"c.mp4"}

    final = finalize_output(out, order=["a.mp4", "b.mp4", "c.mp4", "d.mp4", "e.mp4"])
    assert list(final["path"]) == ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]
    assert find_part_files(out) == []
    assert read_metadata(out).equals(final)
    assert finalize_output(out).equals(final)


def test_trim_incomplete_record(tmp_path):
    part = write(tmp_path / "p.csv", HEADER + 'a.mp4,1,"two\nlines",ok,\n' + 'b.mp4,2,"cut\nhere')
    assert trim_incomplete_record(part) == len('b.mp4,2,"cut\nhere')
    assert part.read_text() == HEADER + 'a.mp4,1,"two\nlines",ok,\n'
    assert trim_incomplete_record(part) == 0
    assert trim_incomplete_record(tmp_path / "absent.csv") == 0


# ---------------------------------------------------------------- set operations


def test_difference_intersection_remove_empty_caption():
    data = pd.DataFrame({"path": ["a", "b", "c"], "id": ["1", "2", "3"]})
    assert list(difference(data, pd.DataFrame({"path": ["b", "z"]}))["path"]) == ["a", "c"]
    assert list(difference(data, {"a", "c"})["path"]) == ["b"]

    other = pd.DataFrame({"path": ["c", "a", "a", "z"], "id": ["x", "x", "y", "x"], "aes": ["5.0", "4", "4.5", "1"]})
    assert rows(intersection(data, other)) == [
        {"path": "a", "id": "1", "aes": "4.5"},
        {"path": "c", "id": "3", "aes": "5.0"},
    ]

    captions = pd.DataFrame({"path": ["a", "b", "c", "d"], "text": ["cat", "", "  \n", float("nan")]})
    assert list(remove_empty_caption(captions)["path"]) == ["a"]
    with pytest.raises(MetadataError, match="no caption column 'caption'"):
        remove_empty_caption(captions, "caption")


# ---------------------------------------------------------------- row keys


def test_row_keys_are_paths_unless_a_row_names_part_of_the_file():
    table = pd.DataFrame({"path": ["a", "a", "a", "b"], "start": ["", "0", "0", ""], "end": ["", "1", "1.0", ""],
                          "window": ["", "", "", "2"]})
    assert row_keys(table) == ["a", ("a", "0", "1", "", ""), ("a", "0", "1.0", "", ""), ("b", "", "", "", "2")]
    assert row_keys(pd.DataFrame({"path": ["a"], "timestamp": ["(1, 2)"]})) == [("a", "", "", "(1, 2)", "")]


def test_segments_of_one_path_merge_separately():
    columns = ["path", "start", "end", "text", "status", "error"]
    first = pd.DataFrame([["a", "0", "1", "", "error", "oom"], ["a", "1", "2", "second", "ok", ""],
                          ["a", "", "", "whole", "ok", ""]], columns=columns)
    again = pd.DataFrame([["a", "0", "1", "first", "ok", ""], ["a", "1", "2", "", "error", "late"]], columns=columns)
    merged = merge_tables([first, again])
    assert [(r["start"], r["end"], r["text"]) for r in rows(merged)] == [("0", "1", "first"), ("1", "2", "second"),
                                                                        ("", "", "whole")]


def test_duplicate_warning_counts_keys_not_paths(tmp_path, caplog):
    csv = write(tmp_path / "seg.csv", "path,start\na.mp4,0\na.mp4,1\na.mp4,0\n")
    with caplog.at_level(logging.WARNING, logger="pipeline.datasets.metadata"):
        read_metadata(csv)
    (record,) = caplog.records
    assert "1 duplicate row(s) with the same 'path'/'start'" in record.message


WINDOW_COLUMNS = ["path", "start", "end", "segment_start", "segment_end", "window", "num_windows", "text",
                  "status", "error"]


def test_window_rows_know_their_input_row_and_replace_its_error(tmp_path):
    out = tmp_path / "out.csv"
    # An earlier run: the input row (a, 10, "") failed before it could be split.
    write_csv_atomic(pd.DataFrame([["a", "10", "", "10", "", "", "", "", "error", "unreadable"],
                                   ["a", "0", "5", "0", "5", "", "", "", "error", "bad"]],
                                  columns=WINDOW_COLUMNS), out)
    # A retry windowed it (window 1 first, as ranks may finish out of order).
    write_csv_atomic(pd.DataFrame([["a", "20", "25", "10", "", "1", "2", "later", "ok", ""],
                                   ["a", "10", "20", "10", "", "0", "2", "earlier", "ok", ""]],
                                  columns=WINDOW_COLUMNS), part_path(out, 0))
    table = read_progress(out).table
    assert source_keys(table) == [("a", "0", "5", "", ""), ("a", "10", "", "", ""), ("a", "10", "", "", "")]
    assert list(table["error"]) == ["bad", "", ""], "the stale error of the windowed row is gone"

    final = finalize_output(out, order=pd.DataFrame({"path": ["a", "a"], "start": ["10", "0"], "end": ["", "5"]}))
    assert [(r["window"], r["text"] or r["error"]) for r in rows(final)] == [("0", "earlier"), ("1", "later"),
                                                                            ("", "bad")]


def test_difference_and_intersection_use_row_keys():
    data = pd.DataFrame({"path": ["a", "a", "b"], "start": ["0", "5", ""], "id": ["1", "2", "3"]})
    done = pd.DataFrame({"path": ["a", "b"], "start": ["5", ""], "aes": ["4", "6"]})
    assert list(difference(data, done)["id"]) == ["1"]
    assert rows(intersection(data, done)) == [{"path": "a", "start": "5", "id": "2", "aes": "4"},
                                              {"path": "b", "start": "", "id": "3", "aes": "6"}]
    windows = pd.DataFrame({"path": ["b", "b"], "window": ["0", "1"], "start": ["0", "10"], "text": ["x", "y"]})
    assert list(difference(data, windows)["id"]) == ["1", "2"], "a windowed output covers its input rows"
    assert rows(intersection(data, windows)) == [{"path": "b", "start": "", "id": "3", "window": "1",
                                                  "text": "y"}]


def test_split_timestamps_gives_one_row_per_scene():
    data = pd.DataFrame({"path": ["a", "b", "c"], "id": ["1", "2", "3"],
                         "timestamp": ["[('00:00:00.000', '00:00:01.500'), ('00:00:01.500', '00:00:04.000')]",
                                       "('00:00:02.000', '00:00:03.000')", ""]})
    assert rows(split_timestamps(data)) == [
        {"path": "a", "id": "1", "timestamp": "('00:00:00.000', '00:00:01.500')"},
        {"path": "a", "id": "1", "timestamp": "('00:00:01.500', '00:00:04.000')"},
        {"path": "b", "id": "2", "timestamp": "('00:00:02.000', '00:00:03.000')"},
        {"path": "c", "id": "3", "timestamp": ""},
    ]
    with pytest.raises(MetadataError, match="row 1: timestamp 'soon' is not a list of"):
        split_timestamps(pd.DataFrame({"path": ["a"], "timestamp": ["soon"]}))
    with pytest.raises(MetadataError, match="no 'timestamp' column"):
        split_timestamps(pd.DataFrame({"path": ["a"]}))


# ---------------------------------------------------------------- command line


def datautil(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.datasets.datautil", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_cli_merge_difference_and_filter(tmp_path):
    part0, part1 = result_tables()
    write_csv_atomic(part0, tmp_path / "out.csv.part0.csv")
    write_csv_atomic(part1, tmp_path / "out.csv.part1.csv")
    write(tmp_path / "meta.csv", "path,id\na.mp4,1\nb.mp4,2\nc.mp4,3\nd.mp4,4\n")

    merge = datautil("out.csv.part*.csv", "--output", "merged/out.csv", cwd=tmp_path)
    assert merge.returncode == 0, merge.stderr
    assert "read 3 rows from out.csv.part0.csv" in merge.stdout
    assert "read 3 rows from out.csv.part1.csv" in merge.stdout
    assert "dropped 3 duplicate rows (3 unique row keys)" in merge.stdout
    assert "wrote 3 rows to merged/out.csv" in merge.stdout
    assert read_metadata(tmp_path / "merged" / "out.csv").equals(merge_tables([part0, part1]))

    remaining = datautil("meta.csv", "--difference", "merged/out.csv", cwd=tmp_path)
    assert remaining.returncode == 0, remaining.stderr
    assert "difference: removed 3 rows" in remaining.stdout
    assert rows(read_metadata(tmp_path / "meta_difference.csv")) == [{"path": "d.mp4", "id": "4"}]

    joined = datautil(
        "meta.csv", "--intersection", "merged/out.csv", "--remove-empty-caption", "--output", "j.csv", cwd=tmp_path
    )
    assert joined.returncode == 0, joined.stderr
    assert "intersection: removed 1 rows" in joined.stdout
    assert "remove-empty-caption: removed 1 rows" in joined.stdout
    assert "wrote 2 rows to j.csv" in joined.stdout
    assert rows(read_metadata(tmp_path / "j.csv")) == [
        {"path": "a.mp4", "id": "1", "text": "a second", "status": "ok", "error": ""},
        {"path": "b.mp4", "id": "2", "text": "b ok", "status": "ok", "error": ""},
    ]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_cli_error_for_csv_without_path(tmp_path):
    write(tmp_path / "bad.csv", "video\na.mp4\n")
    result = datautil("bad.csv", "--output", "out.csv", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.csv" in lines[0] and "'video'" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.csv").exists()

    missing = datautil("nothing_*.csv", cwd=tmp_path)
    assert missing.returncode == 1 and "no file matches" in missing.stderr


def test_cli_split_timestamp(tmp_path):
    write(tmp_path / "meta_timestamp.csv",
          'path,timestamp\na.mp4,"[(\'00:00:00.000\', \'00:00:01.000\'), (\'00:00:01.000\', \'00:00:02.000\')]"\n')
    result = datautil("meta_timestamp.csv", "--split-timestamp", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "split-timestamp: 1 rows became 2 scene rows" in result.stdout
    assert list(read_metadata(tmp_path / "meta_timestamp_split.csv")["timestamp"]) == [
        "('00:00:00.000', '00:00:01.000')", "('00:00:01.000', '00:00:02.000')"]
    assert "--split-timestamp" in datautil("--help", cwd=tmp_path).stdout


def test_cli_help_explains_flags(tmp_path):
    result = datautil("--help", cwd=tmp_path)
    assert result.returncode == 0
    for flag in ("--output", "--difference", "--intersection", "--remove-empty-caption", "examples:"):
        assert flag in result.stdout
