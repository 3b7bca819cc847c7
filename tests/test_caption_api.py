"""caption_api.py: any OpenAI-compatible endpoint through the captioning runner.

A small HTTP endpoint on 127.0.0.1 (the standard library's server) answers like a hosted API does
under load: 429 with Retry-After, a 503, a refusal (400) for one video. It checks what arrives: the
Bearer key, the frames as JPEG data URLs, the question.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.captioning import caption_api
from pipeline.datasets.video import sample_frames
from tests.test_runner import make_dataset, read_rows

KEY = "sk-test-5f0c1b2e9a"


def describe(urls: list[str]) -> str:
    """The endpoint's caption: the frames' count and size, and a digest of their pixels."""
    frames = [cv2.imdecode(np.frombuffer(base64.b64decode(u.removeprefix("data:image/jpeg;base64,")), np.uint8),
                           cv2.IMREAD_COLOR) for u in urls]
    digest = hashlib.sha1(b"".join(f.tobytes() for f in frames)).hexdigest()[:10]
    return f"{len(frames)} frames of {frames[0].shape[1]}x{frames[0].shape[0]}, digest {digest}"


class Endpoint(ThreadingHTTPServer):
    """Answers /v1/models and /v1/chat/completions; ``plan`` maps a video's mean grey level to its answers."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict] = []
        self.headers_seen: list[str] = []
        self.failures: dict[str, list[int]] = {}   # caption -> HTTP codes to answer first, in order
        self.refused: set[str] = set()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    server: Endpoint

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path != "/v1/models":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        self.server.headers_seen.append(self.headers.get("Authorization", ""))
        self._send(200, {"object": "list", "data": [{"id": "tiny-vlm", "object": "model"}]})

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            with self.server.lock:
                self.server.requests.append({})
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        frames = [part["image_url"]["url"] for part in payload["messages"][0]["content"] if part["type"] == "image_url"]
        caption = describe(frames)
        with self.server.lock:
            self.server.requests.append(payload)
            self.server.headers_seen.append(self.headers.get("Authorization", ""))
            planned = self.server.failures.get(caption, [])
            code = planned.pop(0) if planned else 200
        if caption in self.server.refused:
            self._send(400, {"error": {"message": "this image breaks the content policy", "type": "invalid_request"}})
        elif code == 429:
            self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"})
        elif code != 200:
            self._send(code, {"error": {"message": "overloaded"}})
        else:
            self._send(200, {"id": "c1", "object": "chat.completion", "model": payload["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": caption},
                                          "finish_reason": "length" if payload["max_tokens"] < 5 else "stop"}],
                             "usage": {"prompt_tokens": 100 + len(frames), "completion_tokens": 7,
                                       "total_tokens": 107 + len(frames)}})


@pytest.fixture
def endpoint():
    server = Endpoint()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def expected(folder: Path, rel: str, num_frames: int = 3) -> str:
    """What the endpoint answers for a video: from the frames the runner samples, as JPEGs."""
    frames, _ = sample_frames(str(folder / rel), num_frames=num_frames)
    return describe(caption_api.encode_frames(frames, 512, 85))


def test_captions_with_retries_token_columns_and_a_refused_row(endpoint, tmp_path, monkeypatch, caplog):
    csv_path = make_dataset(tmp_path, 5)
    answers = {f"videos/v{i:02d}.mp4": expected(tmp_path, f"videos/v{i:02d}.mp4") for i in range(5)}
    assert len(set(answers.values())) == 5, "every video gets its own answer"
    endpoint.failures = {answers["videos/v01.mp4"]: [429, 429], answers["videos/v02.mp4"]: [503]}
    endpoint.refused = {answers["videos/v03.mp4"]}
    monkeypatch.setenv("TEST_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "captions.csv"
    caption_api.main([str(csv_path), "--base_url", endpoint.url, "--api_key_env", "TEST_API_KEY", "--bs", "5",
                      "--backoff", "0.05", "--device", "CPU", "--output", str(out), "--no-cleanup"])
    rows = {r["path"]: r for r in read_rows(out)}
    for path, caption in answers.items():
        row = rows[path]
        if path == "videos/v03.mp4":
            assert row["status"] == "error" and "HTTP 400" in row["error"] and "content policy" in row["error"]
            continue
        assert (row["status"], row["text"], row["prompt_tokens"], row["completion_tokens"], row["truncated"]) == \
            ("ok", caption, "103", "7", "false"), path
        assert row["id"] and row["note"], "the input's columns are kept"
    assert len(endpoint.requests) == 5 + 2 + 1, "two 429s and a 503 were retried, the 400 was not"
    payload = endpoint.requests[0]
    assert payload["model"] == "tiny-vlm", "the model is the first that /v1/models lists"
    assert payload["messages"][0]["content"][0]["text"].startswith("Describe this video")
    assert all(h == f"Bearer {KEY}" for h in endpoint.headers_seen)
    written = out.read_text() + "".join(p.read_text() for p in tmp_path.glob("captions*"))
    assert KEY not in written and KEY not in caplog.text, "the key is never written or logged"

    calls = len(endpoint.requests)
    caption_api.main([str(csv_path), "--base_url", endpoint.url, "--api_key_env", "TEST_API_KEY",
                      "--device", "CPU", "--output", str(out)])
    assert len(endpoint.requests) == calls, "a finished run sends nothing again"


def test_endpoint_that_keeps_failing_gives_error_rows(endpoint, tmp_path):
    csv_path = make_dataset(tmp_path, 2)
    answers = [expected(tmp_path, f"videos/v{i:02d}.mp4", num_frames=2) for i in range(2)]
    endpoint.failures = {answers[0]: [500] * 10}
    out = tmp_path / "captions.csv"
    caption_api.main([str(csv_path), "--base_url", endpoint.url, "--model", "tiny-vlm", "--num_frames", "2",
                      "--max_retries", "2", "--backoff", "0", "--max_new_tokens", "3", "--device", "CPU",
                      "--output", str(out)])
    rows = read_rows(out)
    assert rows[0]["status"] == "error" and "HTTP 500" in rows[0]["error"] and "after 3 attempts" in rows[0]["error"]
    assert rows[1]["status"] == "ok" and rows[1]["truncated"] == "true", "finish_reason length is flagged"


def test_bad_settings_are_refused_clearly(endpoint, tmp_path, monkeypatch):
    csv_path = make_dataset(tmp_path, 1)
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    for flags, message in [(["--base_url", endpoint.url, "--api_key_env", "NO_SUCH_KEY_VAR"],
                            "--api_key_env NO_SUCH_KEY_VAR: that environment variable is not set"),
                           (["--base_url", "127.0.0.1:8000/v1"], "--base_url must be an http(s) URL"),
                           (["--base_url", endpoint.url.removesuffix("/v1")], "cannot find the model to use: HTTP 404")]:
        out = tmp_path / "out.csv"
        with pytest.raises(SystemExit) as exc:
            caption_api.main([str(csv_path), *flags, "--device", "CPU", "--output", str(out)])
        assert message in str(exc.value), exc.value
        assert not out.exists()


def test_a_wrong_path_is_not_retried(endpoint, tmp_path):
    csv_path = make_dataset(tmp_path, 2)
    out = tmp_path / "out.csv"
    with pytest.raises(SystemExit, match="all 2 rows this run tried failed"):
        caption_api.main([str(csv_path), "--base_url", endpoint.url.removesuffix("/v1"), "--model", "m",
                          "--device", "CPU", "--output", str(out)])
    assert len(endpoint.requests) == 2, "a 404 is an error row at once"
    assert all("HTTP 404" in r["error"] and "usually ends in /v1" in r["error"] for r in read_rows(out))
