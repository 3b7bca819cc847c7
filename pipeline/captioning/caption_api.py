"""Caption videos with any OpenAI-compatible chat endpoint: GPT-4o, a vLLM server, or ``pipeline.serve``.

Each row's sampled frames (``--num_frames``, default 3 as in Open-Sora's GPT-4V captioner) go
as JPEG data URLs, after the question, in one user message to ``<base_url>/chat/completions``;
the reply is the caption. It runs through the captioning runner like every other captioner
(resume, error rows, part files, msrun). A batch's ``--bs`` rows are sent together, at most
``--concurrency`` at a time; 429 and 5xx answers, timeouts and dropped connections are retried
with exponential backoff (a server's ``Retry-After`` is honoured), other 4xx answers make that
row an error row. ``--timeout`` bounds each attempt as a whole (connect, send, the full answer), so
a server that trickles bytes cannot hold a row; a redirect is not followed (the frames and the key
would go to another address) and an answer over ``--max_response_bytes`` is not kept: both make
error rows. Each row records ``prompt_tokens`` and ``completion_tokens`` from the answer's
``usage``, and ``truncated`` when the endpoint stopped at ``--max_new_tokens``. ``--schema`` goes with
every request as ``response_format`` (``json_schema``, strict), so the endpoint constrains the reply; the
runner checks each reply's JSON and splits it into columns as for any captioner.

The API key is read from the environment variable ``--api_key_env`` names, and only from there:
it is never logged or written.

    OPENAI_API_KEY=... python -m pipeline.captioning.caption_api meta.csv \\
        --base_url https://api.openai.com/v1 --model gpt-4o --api_key_env OPENAI_API_KEY
    python -m pipeline.captioning.caption_api meta.csv --base_url http://127.0.0.1:8000/v1
"""
from __future__ import annotations

import argparse
import base64
import functools
import http.client
import json
import logging
import os
import random
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from pipeline.captioning.cli import add_cleanup_flags, add_prompt_flags, caption_schema, common_parser, main_with
from pipeline.captioning.results import TRUNCATED_COLUMN
from pipeline.captioning.runner import FrameSpec, RunSummary
from pipeline.config import CONFIG_DIR, ConfigError

logger = logging.getLogger(__name__)

BASE_CONFIG = CONFIG_DIR / "captioning" / "api.yaml"
TOKEN_COLUMNS = ("prompt_tokens", "completion_tokens")
RETRIED_STATUS = (408, 429)  # and every 5xx
ERROR_BODY_BYTES = 65536  # of an error answer, enough for its message


class ApiError(RuntimeError):
    """The endpoint refused a request, or kept failing after the retries; the message says which."""


class _Transient(Exception):
    """An attempt failed in a way worth retrying (429, 5xx, a timeout, a dropped connection)."""

    def __init__(self, problem: str, retry_after: str | None = None):
        super().__init__(problem)
        self.retry_after = retry_after


@dataclass
class ApiSettings:
    base_url: str
    model: str | None = None
    api_key: str | None = None
    question: str = "Describe this video in detail."
    max_tokens: int = 300
    temperature: float | None = None
    top_p: float | None = None
    detail: str | None = None
    timeout: float = 60.0       # seconds for a whole attempt: connect, send, the full answer
    max_retries: int = 5
    backoff: float = 1.0        # seconds before the first retry; doubled each time, capped at a minute
    concurrency: int = 8
    max_response_bytes: int = 2 ** 20
    response_format: dict | None = None  # sent as is: --schema's {"type": "json_schema", ...}


def encode_frames(frames: np.ndarray, max_side: int, quality: int) -> list[str]:
    """(T, H, W, 3) uint8 RGB frames as JPEG data URLs, scaled down so the longer side is at most ``max_side``."""
    urls = []
    for frame in frames:
        height, width = frame.shape[:2]
        scale = max_side / max(height, width)
        if scale < 1:
            frame = cv2.resize(frame, (max(1, round(width * scale)), max(1, round(height * scale))),
                               interpolation=cv2.INTER_AREA)
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise ValueError(f"could not encode a {frame.shape} frame as JPEG")
        urls.append("data:image/jpeg;base64," + base64.b64encode(data.tobytes()).decode("ascii"))
    return urls


def _error_text(body: bytes) -> str:
    """The message of an OpenAI-style error body, else the body's start."""
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
    except (ValueError, AttributeError, RecursionError):
        pass
    return body[:300].decode("utf-8", "replace")


class _Deadline:
    """Shuts an attempt's sockets down when its time is up: socket timeouts bound each read, not the
    answer, so a server sending a byte a second would otherwise hold the row for as long as it likes."""

    def __init__(self, seconds: float):
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    """Wake a thread blocked on ``sock`` (it reads an end of stream); the socket may be closed already."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Watched:
    """A connection whose socket, once connected, is under the attempt's deadline."""

    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self) -> None:
        super().connect()
        self.deadline.watch(self.sock)


class _WatchedHTTP(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, http.client.HTTPSConnection):
    pass


class _TimedRequest(urllib.request.Request):
    """Carries the attempt's deadline to the connection urllib opens for it."""

    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: _TimedRequest) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_WatchedHTTP, deadline=req.deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    context = ssl.create_default_context()

    def https_open(self, req: _TimedRequest) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_WatchedHTTPS, deadline=req.deadline), req, context=self.context)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would follow a 302 as a GET without the frames, with the Bearer key, to any host: follow none."""

    def redirect_request(self, req, fp, code, msg, headers, newurl) -> None:
        return None


def _read_at_most(response, limit: int) -> bytes:
    """The body, or its first ``limit + 1`` bytes when it is longer; IncompleteRead when the connection
    closes before the Content-Length it announced (``read(n)`` itself returns the short body silently)."""
    data = bytearray()
    while len(data) <= limit:
        chunk = response.read(min(65536, limit + 1 - len(data)))
        if not chunk:
            break
        data += chunk
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and len(data) < min(int(length), limit + 1):
        raise http.client.IncompleteRead(bytes(data), int(length) - len(data))
    return bytes(data)


def _error_body(error: urllib.error.HTTPError) -> bytes:
    """The start of an error answer's body, as much as arrives (its message is all that is used)."""
    try:
        return _read_at_most(error, ERROR_BODY_BYTES)
    except (OSError, http.client.HTTPException):
        return b""


class ApiClient:
    """JSON over HTTP to one OpenAI-compatible endpoint, with retries for the answers worth retrying."""

    def __init__(self, settings: ApiSettings):
        self.settings = settings
        self.base = settings.base_url.rstrip("/")
        self.opener = urllib.request.build_opener(_NoRedirects, _DeadlineHTTPHandler, _DeadlineHTTPSHandler)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        return headers

    def request(self, path: str, payload: dict | None = None) -> dict:
        """GET (no payload) or POST ``payload`` to ``<base_url><path>``; the decoded JSON answer."""
        url = self.base + path
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        attempt = 0
        while True:
            try:
                body = self._attempt(url, data)
                break
            except _Transient as exc:
                if attempt >= self.settings.max_retries:
                    raise ApiError(f"{exc} (gave up after {attempt + 1} attempts)") from None
                time.sleep(self._delay(attempt, exc.retry_after))
                attempt += 1
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise ApiError(f"{url} answered with something that is not JSON") from None

    def _attempt(self, url: str, data: bytes | None) -> bytes:
        """One request under the ``--timeout`` deadline: the body, an ApiError, or a _Transient to retry."""
        timeout, limit = self.settings.timeout, self.settings.max_response_bytes
        deadline = _Deadline(timeout)
        req = _TimedRequest(url, data=data, headers=self._headers(), method="GET" if data is None else "POST",
                            deadline=deadline)
        late = f"no complete answer from {url} within --timeout {timeout:g} s"
        try:
            with self.opener.open(req, timeout=timeout) as response:
                body = _read_at_most(response, limit)
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                raise ApiError(f"HTTP {exc.code} from {url} redirects to {exc.headers.get('Location')!r}: "
                               f"redirects are not followed (the frames and the API key would go there); "
                               f"give the final address as --base_url") from None
            problem = f"HTTP {exc.code} from {url}: {_error_text(_error_body(exc))}"
            if exc.code not in RETRIED_STATUS and exc.code < 500:
                hint = " (the base URL usually ends in /v1)" if exc.code == 404 else ""
                raise ApiError(problem + hint) from None
            raise _Transient(late if deadline.expired else problem, exc.headers.get("Retry-After")) from None
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, IncompleteRead
            reason = getattr(exc, "reason", None) or repr(exc)
            raise _Transient(late if deadline.expired else f"no complete answer from {url}: {reason}") from None
        finally:
            deadline.cancel()
        if deadline.expired:
            raise _Transient(late)
        if len(body) > limit:
            raise ApiError(f"the answer from {url} is over --max_response_bytes {limit}; not kept")
        return body

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(float(retry_after), 120.0)
            except ValueError:
                pass
        return min(self.settings.backoff * 2 ** attempt, 60.0) * random.uniform(0.75, 1.25)

    def first_model(self) -> str:
        """The first model ``GET /models`` lists (what ``--model`` defaults to)."""
        listed = self.request("/models").get("data") or []
        if not listed or not isinstance(listed[0], dict) or not listed[0].get("id"):
            raise ApiError(f"{self.base}/models lists no model; pass --model")
        return str(listed[0]["id"])


class ApiCaptioner:
    """Sends each video's frames to the endpoint; a batch's requests run concurrently."""

    extra_columns = (*TOKEN_COLUMNS, TRUNCATED_COLUMN)

    def __init__(self, settings: ApiSettings, num_frames: int = 3, max_side: int = 512, jpeg_quality: int = 85):
        self.settings = settings
        self.client = ApiClient(settings)
        self.model = settings.model or self.client.first_model()
        logger.info("captioning with model %s at %s", self.model, self.client.base)
        self.frame_spec = FrameSpec(num_frames=num_frames)
        self.max_side = max_side
        self.jpeg_quality = jpeg_quality
        self.pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="api")

    def prepare(self, frames: np.ndarray) -> list[str]:
        return encode_frames(frames, self.max_side, self.jpeg_quality)

    def payload(self, frame_urls: Sequence[str]) -> dict:
        image = {"detail": self.settings.detail} if self.settings.detail else {}
        content = [{"type": "text", "text": self.settings.question}]
        content += [{"type": "image_url", "image_url": {"url": url, **image}} for url in frame_urls]
        payload = {"model": self.model, "messages": [{"role": "user", "content": content}],
                   "max_tokens": self.settings.max_tokens}
        for name in ("temperature", "top_p", "response_format"):
            if getattr(self.settings, name) is not None:
                payload[name] = getattr(self.settings, name)
        return payload

    def caption(self, frame_urls: Sequence[str]) -> dict[str, str]:
        answer = self.client.request("/chat/completions", self.payload(frame_urls))
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ApiError(f"the answer has no choices[0].message.content: {json.dumps(answer)[:300]}") from None
        if not isinstance(text, str) or not text.strip():
            raise ApiError(f"the endpoint answered with an empty caption (finish_reason "
                           f"{choice.get('finish_reason')!r})")
        usage = answer.get("usage") or {}
        return {"text": text.strip(), **{name: usage.get(name, "") for name in TOKEN_COLUMNS},
                TRUNCATED_COLUMN: str(choice.get("finish_reason") == "length").lower()}

    def generate(self, batch: Sequence[list[str]]) -> list[dict | BaseException]:
        """One request per video, concurrently; a video whose request failed gets its exception."""
        futures = [self.pool.submit(self.caption, urls) for urls in batch]
        return [future.exception() or future.result() for future in futures]


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(
        "Caption videos with an OpenAI-compatible chat endpoint (GPT-4o, vLLM, pipeline.serve): the sampled "
        "frames go as JPEG images with the question, the reply is the caption.", model=False,
        epilog="examples:\n"
               "  OPENAI_API_KEY=... python -m pipeline.captioning.caption_api meta.csv "
               "--base_url https://api.openai.com/v1 --model gpt-4o --api_key_env OPENAI_API_KEY\n"
               "  python -m pipeline.captioning.caption_api meta.csv --base_url http://127.0.0.1:8000/v1")
    add_prompt_flags(p)
    add_cleanup_flags(p)
    g = p.add_argument_group("endpoint")
    g.add_argument("--base_url", help="the API's base URL, up to and including /v1 "
                                      "(e.g. https://api.openai.com/v1, http://127.0.0.1:8000/v1)")
    g.add_argument("--model", help="model name to ask for (default: the first one GET <base_url>/models lists)")
    g.add_argument("--api_key_env", metavar="VAR",
                   help="environment variable holding the API key, sent as a Bearer token (default: no key)")
    g.add_argument("--concurrency", type=int, help="requests in flight at once per process (a batch of --bs "
                                                   "rows is sent together, so at most --bs)")
    g.add_argument("--timeout", type=float, help="seconds one attempt may take as a whole (connect, send, the full "
                                                 "answer) before it is retried")
    g.add_argument("--max_retries", type=int, help="retries of a request after 429, 5xx, a timeout or a dropped "
                                                   "connection, with exponential backoff; then the row is an error row")
    g.add_argument("--max_response_bytes", type=int, default=2 ** 20,
                   help="a longer answer is not kept: the row is an error row")
    g.add_argument("--backoff", type=float, help="seconds before the first retry, doubled for each next one "
                                                 "(capped at a minute); a Retry-After header overrides it")
    g.add_argument("--temperature", type=float, help="sampling temperature sent with each request (default: the "
                                                     "endpoint's)")
    g.add_argument("--top_p", type=float, help="nucleus sampling top_p sent with each request (default: the "
                                               "endpoint's)")
    g.add_argument("--detail", choices=["low", "high", "auto"],
                   help="OpenAI's image detail (low: 85 tokens a frame); default: not sent")
    g.add_argument("--max_side", type=int, help="frames are scaled down to at most this many pixels on their "
                                                "longer side before JPEG encoding")
    g.add_argument("--jpeg_quality", type=int, help="JPEG quality of the frames sent (1 to 100)")
    return p


def settings_from_args(args: argparse.Namespace) -> ApiSettings:
    """The endpoint settings, checked; the key comes from the named environment variable only."""
    if not args.base_url or not args.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"--base_url must be an http(s) URL such as http://127.0.0.1:8000/v1 (got {args.base_url!r})")
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise ConfigError(f"--api_key_env {args.api_key_env}: that environment variable is not set or empty")
    for name in ("concurrency", "max_side", "max_response_bytes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if not 1 <= args.jpeg_quality <= 100:
        raise ConfigError(f"--jpeg_quality must be 1 to 100 (got {args.jpeg_quality})")
    if args.max_retries < 0 or not args.timeout > 0 or args.backoff < 0:
        raise ConfigError("--max_retries and --backoff must be 0 or more, and --timeout positive")
    return ApiSettings(base_url=args.base_url, model=args.model, api_key=key, question=args.question,
                       max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       detail=args.detail, timeout=args.timeout, max_retries=args.max_retries,
                       backoff=args.backoff, concurrency=args.concurrency,
                       max_response_bytes=args.max_response_bytes, response_format=response_format(args))


def response_format(args: argparse.Namespace) -> dict | None:
    """--schema as OpenAI's structured-output request: the endpoint constrains the reply to the schema (OpenAI
    wants a name of at most 64 letters, digits, '_' or '-')."""
    schema = caption_schema(args)
    if schema is None:
        return None
    name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(schema.name).stem)[:64] or "caption"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema.schema, "strict": True}}


def build_captioner(args: argparse.Namespace, dtype: str) -> ApiCaptioner:
    settings = settings_from_args(args)
    try:
        return ApiCaptioner(settings, num_frames=args.num_frames, max_side=args.max_side,
                            jpeg_quality=args.jpeg_quality)
    except ApiError as exc:
        raise ConfigError(f"cannot find the model to use: {exc}") from None


def main(argv: Sequence[str] | None = None) -> RunSummary:
    return main_with(build_parser(), build_captioner, argv, base_config=BASE_CONFIG)


if __name__ == "__main__":
    main()
