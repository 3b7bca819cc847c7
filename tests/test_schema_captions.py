"""Structured captions (--schema) through the captioning runner, on a tiny random Qwen2-VL with a byte-level BPE
tokenizer: every ok row's text is JSON the schema accepts (greedy, beam, sampling), its fields are columns, a
caption cut by --max_new_tokens is an error row, and a bad schema or tokenizer stops the run in one line."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import jsonschema
import pytest

from models.checkpoint import load_tokenizer
from pipeline import distributed
from pipeline.captioning.caption_qwen2vl import Qwen2VLCaptioner, main as qwen_main
from pipeline.captioning.runner import RunOptions, run
from pipeline.captioning.schemas import load_schema, presets
from tests.structured_fixtures import TEST_SCHEMA, save_qwen2vl_bpe
from tests.video_factory import CAPTION_CLIPS, write_caption_clips

distributed.setup("CPU")

CLI = ["--num_frames", "2", "--height", "56", "--width", "84", "--device", "CPU", "--bs", "4",
       "--question", "describe the video", "--num_workers", "1"]
FIELDS = tuple(TEST_SCHEMA["properties"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_qwen2vl_bpe(tmp_path_factory.mktemp("qwen2vl_bpe"))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return write_caption_clips(tmp_path_factory.mktemp("videos"), CAPTION_CLIPS[:3])


@pytest.fixture(scope="module")
def schema_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("schemas") / "scene.json"
    path.write_text(json.dumps(TEST_SCHEMA))
    return path


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_structured(rows: list[dict], schema_name: str) -> None:
    """Every video row is ok, its text JSON that the schema accepts, its fields in the columns."""
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["error"]  # the last video is broken
    for row in rows[:3]:
        caption = json.loads(row["text"])
        jsonschema.validate(caption, TEST_SCHEMA)
        assert row["schema"] == schema_name
        for field in FIELDS:
            value = caption[field]
            cell = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            assert row[f"caption_{field}"] == cell
    assert "text_raw" not in rows[0]  # the clean-up does not touch JSON


def caption(checkpoint: Path, videos: Path, out: Path, *flags: str) -> list[dict]:
    qwen_main([str(videos), "--pretrained_model_name_or_path", str(checkpoint), "--output", str(out), *CLI, *flags])
    return read_rows(out)


def test_greedy_rows_validate(checkpoint, videos, schema_file, tmp_path):
    rows = caption(checkpoint, videos, tmp_path / "greedy.csv", "--schema", str(schema_file), "--max_new_tokens", "96")
    check_structured(rows, "scene.json")
    assert rows[0]["prompt"] == "describe the video"


def test_sampled_rows_validate_with_the_schema_from_a_yaml_config(checkpoint, videos, schema_file, tmp_path):
    config = tmp_path / "structured.yaml"
    config.write_text(f"schema: {schema_file}\nmax_new_tokens: 96\ndo_sample: true\ntemperature: 1.5\n")
    rows = caption(checkpoint, videos, tmp_path / "sampled.csv", "--config", str(config), "--seed", "3")
    check_structured(rows, "scene.json")


def test_beam_rows_validate(checkpoint, videos, schema_file, tmp_path):
    schema = load_schema(str(schema_file))
    grammar = schema.grammar(load_tokenizer(checkpoint))
    captioner = Qwen2VLCaptioner(str(checkpoint), question="describe the video", num_frames=2, height=56, width=84,
                                 max_new_tokens=96, generation={"num_beams": 2, "grammar": grammar})
    out = tmp_path / "beam.csv"
    run(captioner, RunOptions(input=str(videos), output=str(out), bs=4, num_workers=1, caption_schema=schema))
    check_structured(read_rows(out), "scene.json")


def test_without_the_schema_the_model_writes_no_json(checkpoint, videos, tmp_path):
    rows = caption(checkpoint, videos, tmp_path / "free.csv", "--max_new_tokens", "24", "--no-cleanup")
    for row in rows[:3]:
        with pytest.raises(ValueError):
            json.loads(row["text"])


def test_a_caption_cut_before_its_json_closes_is_an_error_row(checkpoint, videos, tmp_path):
    with pytest.raises(SystemExit, match="all 4 rows this run tried failed"):
        caption(checkpoint, videos, tmp_path / "cut.csv", "--schema", "hunyuan", "--max_new_tokens", "8")
    rows = read_rows(tmp_path / "cut.csv")
    assert [r["status"] for r in rows] == ["error"] * 4
    for row in rows[:3]:
        assert row["text"] == "" and "JSON is incomplete" in row["error"] and "--max_new_tokens" in row["error"]
    assert {f"caption_{f}" for f in load_schema("hunyuan").fields} <= set(rows[0])


def test_presets_load_and_the_prompt_lists_their_fields():
    assert {"hunyuan", "opensora", "camera_motion"} <= set(presets())
    for name in presets():
        schema = load_schema(name)
        assert schema.name == name and schema.fields
        assert all(f'"{field}"' in schema.instruction() for field in schema.fields)
    assert '"pan left"' in load_schema("camera_motion").instruction()


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a JSON file"),
    ('{"type": "strin"}', "not a valid JSON Schema"),
    ('{"type": "array", "uniqueItems": true}', "cannot follow: Unimplemented keys"),
    (None, "no such preset"),
])
def test_a_bad_schema_stops_the_run_in_one_line(checkpoint, videos, tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as info:
        caption(checkpoint, videos, tmp_path / "out.csv", "--schema", str(path))
    assert str(info.value).startswith("error: --schema") and message in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out.csv").exists()


def test_a_tokenizer_the_engine_cannot_read_stops_the_run_in_one_line(videos, tmp_path):
    from tests.test_qwen2vl import save_checkpoint  # its tokenizer is word-level

    folder = save_checkpoint(tmp_path / "word_level")
    with pytest.raises(SystemExit) as info:
        caption(folder, videos, tmp_path / "out.csv", "--schema", "hunyuan")
    assert "cannot read this tokenizer" in str(info.value) and "\n" not in str(info.value)
