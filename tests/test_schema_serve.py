"""Structured replies from the server (``response_format`` as OpenAI and vLLM take it) and caption_api --schema
against it, on the tiny random Qwen2-VL with a byte-level BPE tokenizer."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import jsonschema
import pytest
import requests

from pipeline import distributed
from pipeline.captioning import caption_api
from pipeline.serve.engine import Engine
from tests.structured_fixtures import TEST_SCHEMA, save_qwen2vl_bpe
from tests.test_serve import ThreadServer, data_url, video_message
from tests.video_factory import CAPTION_CLIPS, write_caption_clips

distributed.setup("CPU")

FLAGS = ["--num_frames", "2", "--height", "56", "--width", "84", "--max_new_tokens", "96"]
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "scene", "schema": TEST_SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return write_caption_clips(tmp_path_factory.mktemp("videos"), CAPTION_CLIPS[:2])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = save_qwen2vl_bpe(tmp_path_factory.mktemp("qwen2vl_bpe"))
    with ThreadServer(Engine.load(str(folder), FLAGS, device="CPU"), max_tokens=96) as url:
        yield url


def complete(url: str, videos: Path, **body) -> requests.Response:
    message = video_message(data_url(videos.parent / "v0.mp4"), "describe the video")
    return requests.post(f"{url}/v1/chat/completions", json={"messages": [message], **body}, timeout=120)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.2, "seed": 4}])
def test_a_json_schema_reply_validates(server, videos, sampling):
    response = complete(server, videos, response_format=SCHEMA_FORMAT, **sampling)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    jsonschema.validate(json.loads(choice["message"]["content"]), TEST_SCHEMA)
    assert choice["finish_reason"] == "stop"


def test_a_json_object_reply_and_a_streamed_schema_reply(server, videos):
    response = complete(server, videos, response_format={"type": "json_object"}, max_tokens=32)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]  # any object: this random model's first key never ends
    assert choice["message"]["content"].startswith('{"') and choice["finish_reason"] == "length"
    with complete(server, videos, response_format=SCHEMA_FORMAT, stream=True) as streamed:
        chunks = [json.loads(line[len(b"data: "):]) for line in streamed.iter_lines()
                  if line.startswith(b"data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    jsonschema.validate(json.loads(text), TEST_SCHEMA)


def test_a_reply_cut_by_max_tokens_ends_with_length(server, videos):
    response = complete(server, videos, response_format=SCHEMA_FORMAT, max_tokens=6)
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith("{")


@pytest.mark.parametrize("response_format, field", [
    ("json", "'response_format' must be an object"),
    ({"type": "xml"}, "'response_format.type'"),
    ({"type": "json_schema"}, "'response_format.json_schema'"),
    ({"type": "json_schema", "json_schema": {"schema": TEST_SCHEMA}}, "'response_format.json_schema.name'"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": TEST_SCHEMA, "strict": "yes"}},
     "'response_format.json_schema.strict'"),
    ({"type": "json_schema", "json_schema": {"name": "s"}}, "'response_format.json_schema.schema' must be"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "strin"}}},
     "'response_format.json_schema.schema': not a valid JSON Schema"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "array", "uniqueItems": True}}},
     "'response_format.json_schema.schema': the schema uses what the grammar engine"),
])
def test_a_bad_response_format_is_a_400_naming_the_field(server, videos, response_format, field):
    response = complete(server, videos, response_format=response_format)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_response_format" and field in error["message"]


def test_caption_api_sends_the_schema_as_response_format(server, videos, tmp_path):
    schema_file = tmp_path / "scene.json"
    schema_file.write_text(json.dumps(TEST_SCHEMA))
    out = tmp_path / "captions.csv"
    caption_api.main([str(videos), "--base_url", f"{server}/v1", "--output", str(out), "--schema", str(schema_file),
                      "--num_frames", "2", "--max_new_tokens", "96", "--num_workers", "1"])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok", "error"]
    for row in rows[:2]:
        jsonschema.validate(json.loads(row["text"]), TEST_SCHEMA)
        assert row["schema"] == "scene.json" and row["caption_moving"] in ("true", "false")
