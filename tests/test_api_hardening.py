"""caption_api.py against endpoints that misbehave: redirects, trickled and dropped answers, oversized replies.

Each test runs small HTTP servers on 127.0.0.1 whose handler does what a broken or hostile endpoint
does: answer 302 towards another origin, send one byte at a time, close the connection mid-body, send
2 MB. The client must neither follow the redirect (nor send the key there), nor wait past --timeout,
nor keep a partial or oversized answer; a dropped connection is retried.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest

from pipeline.captioning import caption_api
from pipeline.captioning.caption_api import ApiClient, ApiError, ApiSettings
from tests.test_caption_api import describe, expected
from tests.test_runner import make_dataset, read_rows

KEY = "sk-hardening-7d1e"
ANSWER = {"id": "c1", "object": "chat.completion", "model": "m",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "a caption"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 10, "completion_tokens": 2}}
PAYLOAD = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}

Behaviour = Callable[["Handler", bytes], None]


class Server(ThreadingHTTPServer):
    """Answers each request with the next planned behaviour (``plan``), else ``default``; records requests."""

    def __init__(self, default: Behaviour | None = None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.plan: list[Behaviour] = []
        self.by_caption: dict[str, Behaviour] = {}
        self.default = default or ok
        self.seen: list[tuple[str, str, str, int]] = []  # method, path, Authorization, body length
        self.lock = threading.Lock()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address) -> None:
        pass  # the client hanging up on a trickle or an oversized reply is expected


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.seen.append((self.command, self.path, self.headers.get("Authorization", ""), len(body)))
            behaviour = self.server.plan.pop(0) if self.server.plan else None
        if behaviour is None and body and self.server.by_caption:
            content = json.loads(body)["messages"][0]["content"]
            frames = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
            behaviour = self.server.by_caption.get(describe(frames))
        (behaviour or self.server.default)(self, body)

    do_GET = do_POST = _serve

    def head(self, code: int, length: int | None, **headers: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        if length is not None:
            self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()


def ok(handler: Handler, body: bytes) -> None:
    answer = dict(ANSWER, choices=[dict(ANSWER["choices"][0], message={"role": "assistant", "content":
                                                                        f"saw {len(body)} bytes"})])
    data = json.dumps(answer).encode()
    handler.head(200, len(data))
    handler.wfile.write(data)


def redirect_to(target: str, code: int = 302) -> Behaviour:
    def behaviour(handler: Handler, body: bytes) -> None:
        handler.head(code, 0, Location=target)
    return behaviour


def trickle(headers_too: bool, delay: float = 0.1) -> Behaviour:
    """A complete, valid answer sent one byte per ``delay`` seconds (its status line and headers too, or not)."""
    def behaviour(handler: Handler, body: bytes) -> None:
        data = json.dumps(ANSWER).encode()
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
        handler.close_connection = True
        try:
            if not headers_too:
                handler.wfile.write(head)
                handler.wfile.flush()
            for byte in (head if headers_too else b"") + data:
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
                time.sleep(delay)
        except OSError:
            pass  # the client gave up
    return behaviour


def drop_mid_body(handler: Handler, body: bytes) -> None:
    """Headers promise a whole answer, a third of it arrives, then the connection closes."""
    data = json.dumps(ANSWER).encode()
    handler.head(200, len(data))
    handler.wfile.write(data[:len(data) // 3])
    handler.wfile.flush()
    handler.close_connection = True


def oversized(with_length: bool) -> Behaviour:
    """A valid answer whose caption is 2 MB; with or without a Content-Length (then the close ends it)."""
    def behaviour(handler: Handler, body: bytes) -> None:
        answer = dict(ANSWER, choices=[dict(ANSWER["choices"][0], message={"role": "assistant",
                                                                           "content": "x" * 2_000_000})])
        data = json.dumps(answer).encode()
        handler.close_connection = True
        handler.head(200, len(data) if with_length else None)
        try:
            handler.wfile.write(data)
        except OSError:
            pass
    return behaviour


@pytest.fixture
def servers():
    started = []

    def start(default: Behaviour | None = None) -> Server:
        server = Server(default)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def client(server: Server, **settings) -> ApiClient:
    return ApiClient(ApiSettings(**{"base_url": server.origin + "/v1", "model": "m", "api_key": KEY,
                                    "timeout": 5.0, "max_retries": 0, "backoff": 0.0, **settings}))


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_and_the_key_stays_home(servers, code):
    elsewhere = servers()
    endpoint = servers(redirect_to(elsewhere.origin + "/v1/chat/completions", code))
    with pytest.raises(ApiError) as exc:
        client(endpoint, max_retries=3).request("/chat/completions", PAYLOAD)
    message = str(exc.value)
    assert f"HTTP {code}" in message and elsewhere.origin + "/v1/chat/completions" in message
    assert elsewhere.seen == [], "nothing, and no key, goes to the redirect target"
    assert len(endpoint.seen) == 1, "a redirect is refused at once, not retried"


def test_a_redirected_row_is_an_error_row_and_the_others_are_captioned(servers, tmp_path):
    csv_path = make_dataset(tmp_path, 3)
    answers = [expected(tmp_path, f"videos/v{i:02d}.mp4", num_frames=2) for i in range(3)]
    elsewhere = servers()
    endpoint = servers()
    endpoint.by_caption = {answers[0]: redirect_to(elsewhere.origin + "/steal", 302),
                           answers[1]: oversized(with_length=True)}
    out = tmp_path / "captions.csv"
    caption_api.main([str(csv_path), "--base_url", endpoint.origin + "/v1", "--model", "m", "--num_frames", "2",
                      "--max_retries", "2", "--backoff", "0", "--device", "CPU", "--output", str(out)])
    rows = read_rows(out)
    assert [row["status"] for row in rows] == ["error", "error", "ok"]
    assert "HTTP 302" in rows[0]["error"] and elsewhere.origin + "/steal" in rows[0]["error"]
    assert "--max_response_bytes" in rows[1]["error"] and rows[1]["text"] == ""
    assert rows[2]["text"].startswith("saw ") and elsewhere.seen == []
    assert len(endpoint.seen) == 3, "neither the redirect nor the oversized reply is retried"


@pytest.mark.parametrize("headers_too", [False, True], ids=["body", "status line and headers"])
def test_timeout_is_a_deadline_for_the_whole_answer(servers, headers_too):
    """A byte every 0.1 s keeps each read short, yet the whole answer (about 3 s of body, or
    more with the headers) must not outlast --timeout 1."""
    endpoint = servers(trickle(headers_too))
    started = time.monotonic()
    with pytest.raises(ApiError) as exc:
        client(endpoint, timeout=1.0).request("/chat/completions", PAYLOAD)
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"held for {elapsed:.1f} s with --timeout 1"
    assert "within --timeout 1 s" in str(exc.value) and "gave up after 1 attempts" in str(exc.value)


def test_a_timed_out_answer_is_retried(servers):
    endpoint = servers()
    endpoint.plan = [trickle(headers_too=False)]
    answer = client(endpoint, timeout=0.5, max_retries=1).request("/chat/completions", PAYLOAD)
    assert answer["choices"][0]["message"]["content"].startswith("saw ")
    assert len(endpoint.seen) == 2


def test_a_connection_closed_mid_body_is_retried(servers):
    endpoint = servers()
    endpoint.plan = [drop_mid_body, drop_mid_body]
    answer = client(endpoint, max_retries=2).request("/chat/completions", PAYLOAD)
    assert answer["choices"][0]["message"]["content"] == f"saw {len(json.dumps(PAYLOAD))} bytes"
    assert len(endpoint.seen) == 3 and all(seen[3] == len(json.dumps(PAYLOAD)) for seen in endpoint.seen)


def test_a_connection_that_keeps_dropping_gives_up_naming_the_drop(servers):
    endpoint = servers(drop_mid_body)
    with pytest.raises(ApiError, match=r"IncompleteRead.*gave up after 2 attempts"):
        client(endpoint, max_retries=1).request("/chat/completions", PAYLOAD)


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "until close"])
def test_a_reply_over_the_size_limit_is_refused(servers, with_length):
    endpoint = servers(oversized(with_length))
    with pytest.raises(ApiError) as exc:
        client(endpoint, max_retries=2).request("/chat/completions", PAYLOAD)
    assert "over --max_response_bytes 1048576" in str(exc.value)
    assert len(endpoint.seen) == 1, "an oversized reply is not retried"
    assert client(endpoint, max_response_bytes=3_000_000).request("/chat/completions", PAYLOAD)["choices"]


def test_max_response_bytes_flag_is_checked(tmp_path):
    csv_path = make_dataset(tmp_path, 1)
    with pytest.raises(SystemExit, match="--max_response_bytes must be at least 1"):
        caption_api.main([str(csv_path), "--base_url", "http://127.0.0.1:9/v1", "--model", "m",
                          "--max_response_bytes", "0", "--device", "CPU", "--output", str(tmp_path / "o.csv")])
