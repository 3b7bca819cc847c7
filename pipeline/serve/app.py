"""The HTTP application: OpenAI's chat completions over a loaded captioner, a frames endpoint and the web page.

Every error is a JSON body in OpenAI's shape, ``{"error": {"message", "type", "code"}}``, with a
4xx status for what the client can fix; the handler's failure never stops the server.

Any web page the user has open can send requests to a local server, so before a handler runs the
request must name this server in its ``Host`` header (a page on another name that resolves here, DNS
rebinding, does not), come from this server's own page when a browser says where it comes from
(``Origin``), and, when the server has an API key, carry it on every ``/v1`` path.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import math
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import cv2
import numpy as np
from aiohttp import hdrs, web

from models.constrained import ANY_JSON_OBJECT, GrammarError, JsonGrammar
from models.video_llama.modeling import build_prompt_ids
from pipeline.captioning.chat import Turn
from pipeline.datasets.decode_pool import DecodePool
from pipeline.datasets.video import VideoReadError
from pipeline.local_server import known_host, same_origin
from pipeline.serve.batching import Batcher, ClientGone
from pipeline.serve.engine import Clip, Engine, Prepared, RequestError
from pipeline.serve.media import MediaPolicy, MediaRef, fit_images, materialise, parse_messages

logger = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")
ENGINE = web.AppKey("engine", Engine)
SETTINGS = web.AppKey("settings", object)
BATCHER = web.AppKey("batcher", Batcher)
DECODERS = web.AppKey("decoders", ThreadPoolExecutor)
STARTED = web.AppKey("started", int)


@dataclass(frozen=True)
class Settings:
    model_name: str
    max_tokens: int
    max_frames: int
    max_batch: int
    batch_wait_s: float
    decode_workers: int
    media: MediaPolicy
    decode_timeout: float | None = None  # seconds a video may take to decode (None: by frame count; 0: threads)
    api_key: str | None = None  # every /v1 request must send "Authorization: Bearer <api_key>"
    allowed_hosts: frozenset[str] = frozenset()  # Host names answered besides the server's own address ("*": any)


def error_body(status: int, message: str, code: str) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": kind, "code": code}}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every failure as OpenAI's error JSON; the server keeps serving."""
    try:
        return await handler(request)
    except RequestError as exc:
        return error_body(exc.status, str(exc), exc.code)
    except ClientGone as exc:  # nobody reads this answer; the access log shows the 499
        return error_body(499, str(exc), "client_closed_request")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status, "http_error")
        return error_body(exc.status, exc.text or exc.reason, code)
    except Exception:  # noqa: BLE001 - logged; the client gets a 500 and the server stays up
        logger.exception("request %s %s failed", request.method, request.path)
        return error_body(500, "internal error (see the server's log)", "internal_error")


def _authorised(request: web.Request, key: str) -> bool:
    scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


@web.middleware
async def guard(request: web.Request, handler) -> web.StreamResponse:
    """Refuse requests that do not name this server (DNS rebinding), browsers' cross-origin requests
    (another page driving this server) and, with an API key, ``/v1`` requests without it."""
    settings: Settings = request.app[SETTINGS]
    if not known_host(request, settings.allowed_hosts):
        return error_body(400, f"the Host header {request.headers.get(hdrs.HOST)!r} does not name this server; "
                               "names it is reached by (behind a proxy) are given with --allowed_hosts", "invalid_host")
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None and not same_origin(origin, request, settings.allowed_hosts):
        return error_body(403, f"cross-origin requests are refused: Origin {origin!r} is not this server (a page "
                               "served under another name is allowed with --allowed_hosts)", "cross_origin_refused")
    if settings.api_key and request.path.startswith("/v1") and not _authorised(request, settings.api_key):
        response = error_body(401, "a valid API key is needed: send the header 'Authorization: Bearer <key>' (on "
                                   "the chat page, enter it in the API key field)", "invalid_api_key")
        response.headers[hdrs.WWW_AUTHENTICATE] = "Bearer"
        return response
    return await handler(request)


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or (content_type.startswith("application/")
                                                  and content_type.endswith("+json"))


async def read_json(request: web.Request) -> dict:
    """The JSON object a request carries. Browsers send text/plain and form bodies to any site without
    asking it first (no CORS preflight), so only a JSON content type is read, or none from a client that
    is not a browser (one without ``Origin``), as FastAPI does."""
    given = request.headers.get(hdrs.CONTENT_TYPE)
    untyped_from_browser = given is None and hdrs.ORIGIN in request.headers
    if untyped_from_browser or (given is not None and not _is_json(request.content_type)):
        raise RequestError(f"send the body as JSON with 'Content-Type: application/json' (got {given!r})",
                           "unsupported_media_type", 415)
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}", "invalid_json") from exc
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", "invalid_json")
    return body


async def decode_frames(request: web.Request, refs: Sequence[MediaRef]) -> Clip:
    """The media's frames (and a video's frame times), sampled as the runner samples them, decoded in the
    decoder threads."""
    engine: Engine = request.app[ENGINE]
    settings: Settings = request.app[SETTINGS]
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory(prefix="serve_media_") as folder:
        paths = await materialise(refs, settings.media, Path(folder))
        try:
            if refs[0].kind == "video":
                frames = await loop.run_in_executor(request.app[DECODERS], engine.video_frames, paths[0])
            else:
                paths = await loop.run_in_executor(request.app[DECODERS], fit_images, paths, settings.media,
                                                   engine.max_decode_pixels, Path(folder))
                frames = await loop.run_in_executor(request.app[DECODERS], engine.image_frames, paths)
        except VideoReadError as exc:
            raise RequestError(f"the media cannot be read: {exc}", "unreadable_media") from exc
    return frames


def _number(body: dict, name: str, kind: type, low: float, high: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not math.isfinite(value)) or (kind is int and value != int(value)):
        raise RequestError(f"'{name}' must be a finite number", "invalid_parameter")
    if value < low or (high is not None and value > high):
        limits = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise RequestError(f"'{name}' must be {limits}", "invalid_parameter")
    return kind(value)


def response_schema(body: dict) -> tuple[dict | None, str]:
    """The JSON Schema a request's ``response_format`` asks the reply to follow (None: free text) and the field that
    holds it, as OpenAI and vLLM take it: ``{"type": "text"}``, ``{"type": "json_object"}`` (any JSON object), or
    ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`` (the reply always
    follows the schema, strict or not)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None, ""
    if not isinstance(fmt, dict):
        raise RequestError("'response_format' must be an object, e.g. {\"type\": \"json_object\"}",
                           "invalid_response_format")
    kind = fmt.get("type")
    if kind == "text":
        return None, ""
    if kind == "json_object":
        return ANY_JSON_OBJECT, "response_format"
    if kind != "json_schema":
        raise RequestError(f"'response_format.type' must be 'text', 'json_object' or 'json_schema' (got {kind!r})",
                           "invalid_response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise RequestError("'response_format.json_schema' must be an object with 'name' and 'schema'",
                           "invalid_response_format")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise RequestError("'response_format.json_schema.name' must be a non-empty string", "invalid_response_format")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise RequestError("'response_format.json_schema.strict' must be true or false", "invalid_response_format")
    if not isinstance(spec.get("schema"), dict):
        raise RequestError("'response_format.json_schema.schema' must be a JSON Schema object",
                           "invalid_response_format")
    return spec["schema"], "response_format.json_schema.schema"


def response_grammar(engine: Engine, body: dict) -> JsonGrammar | None:
    """The request's ``response_format`` compiled for the model (a 400 naming the field when it cannot be)."""
    schema, field = response_schema(body)
    if schema is None:
        return None
    try:
        return engine.grammar(schema)
    except GrammarError as exc:
        raise RequestError(f"'{field}': {exc}", "invalid_response_format") from None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    engine: Engine = request.app[ENGINE]
    settings: Settings = request.app[SETTINGS]
    body = await read_json(request)
    model = body.get("model", settings.model_name)
    if model != settings.model_name:
        raise RequestError(f"the model {model!r} does not exist; this server has {settings.model_name!r}",
                           "model_not_found", 404)
    if body.get("n") not in (None, 1):
        raise RequestError("only n=1 is supported", "invalid_parameter")
    wanted = _number(body, "max_completion_tokens", int, 1) or _number(body, "max_tokens", int, 1)
    max_tokens = min(wanted or engine.max_new_tokens, settings.max_tokens)
    sampling = dict(temperature=_number(body, "temperature", float, 0, 2), top_p=_number(body, "top_p", float, 0, 1),
                    seed=_number(body, "seed", int, 0), min_tokens=_number(body, "min_tokens", int, 0),
                    grammar=await asyncio.get_running_loop().run_in_executor(request.app[DECODERS],
                                                                             response_grammar, engine, body))
    if (sampling["min_tokens"] or 0) > max_tokens:
        raise RequestError(f"'min_tokens' ({sampling['min_tokens']}) is above the reply's max_tokens ({max_tokens}; "
                           f"this server allows at most {settings.max_tokens})", "invalid_parameter")
    options = engine.options(max_tokens, **sampling)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise RequestError("'stream_options' must be an object, e.g. {\"include_usage\": true}", "invalid_parameter")
    turns, refs = parse_messages(body.get("messages"), settings.max_frames)
    if not refs:
        raise RequestError("the conversation has no video or image: add a video_url or image_url part",
                           "missing_media")
    clip = await decode_frames(request, refs)
    prepared, room = await asyncio.get_running_loop().run_in_executor(
        request.app[DECODERS], prepare_within_context, engine, clip, turns, max_tokens)
    if room < max_tokens:  # the reply ends where the model's positions do (finish_reason "length")
        if (sampling["min_tokens"] or 0) > room:
            raise RequestError(f"'min_tokens' ({sampling['min_tokens']}) is above the {room} tokens the model's "
                               "positions leave after this prompt", "invalid_parameter")
        options = engine.options(room, **sampling)
    seedless = tuple(sorted((k, v) for k, v in options.items() if k != "seed"))
    key = (prepared.num_frames, seedless, id(options) if "seed" in options else None)  # a seed: its own call
    prepared = replace(prepared, is_alive=connected(request))
    reply = Reply(settings.model_name)
    if body.get("stream"):
        include_usage = bool((stream_options or {}).get("include_usage"))
        return await reply.stream(request, prepared, options, key, include_usage)
    return web.json_response(reply.completion(await _answer(request.app[BATCHER].submit(prepared, options, key))))


def connected(request: web.Request) -> Callable[[], bool]:
    """A check of whether the request's client is still connected. aiohttp does not cancel a handler whose
    client left, so the batcher and the model ask this before and while they work for it."""
    def alive() -> bool:
        transport = request.transport
        return transport is not None and not transport.is_closing()
    return alive


async def _answer(submitted: Awaitable[dict]) -> dict:
    try:
        return await submitted
    except ValueError as exc:  # the prompt cannot be built (e.g. text holding the model's media marker)
        raise RequestError(f"the model cannot take this conversation: {exc}", "invalid_prompt") from exc


def max_positions(engine: Engine) -> int | None:
    """The positions the language model has (None for an encoder-decoder: its encoder has no fixed limit)."""
    model = engine.captioner.model
    if not getattr(model, "is_decoder_only", True):
        return None
    return getattr(model.config.text_config, "max_position_embeddings", None)


def prompt_tokens(engine: Engine, prepared: Prepared) -> int:
    """The prompt's length in tokens, visual ones included, built as the family's ``generate`` builds it."""
    captioner, video, text = engine.captioner, prepared.inputs, prepared.prompt
    if engine.family.startswith("qwen"):
        return len(captioner.with_prompt(video, text).input_ids)
    if engine.family in ("llava", "llava_next", "pllava"):
        return len(captioner.model_inputs([video], [text])[0][0])
    if engine.family == "video_llama":
        return len(build_prompt_ids(captioner.tokenizer, text, captioner.model.config.num_video_query_tokens))
    queries = 0 if captioner.image_ids else captioner.model.config.num_query_tokens  # BLIP-2: put in front
    return len(captioner.image_ids) + len(captioner.tokenizer(text)["input_ids"]) + queries


def prepare_within_context(engine: Engine, clip: Clip, turns: Sequence[Turn],
                           max_tokens: int) -> tuple[Prepared, int]:
    """The conversation ready to generate, and the new tokens it may have: ``max_tokens``, or fewer where
    the model's positions end first. A prompt that fills them is refused here, before the model would
    index past its position table."""
    prepared = engine.prepare(clip, turns)
    limit = max_positions(engine)
    if limit is None:
        return prepared, max_tokens
    try:
        used = prompt_tokens(engine, prepared)
    except ValueError as exc:  # e.g. text holding the model's media marker
        raise RequestError(f"the model cannot take this conversation: {exc}", "invalid_prompt") from exc
    if used >= limit:
        raise RequestError(f"the prompt is {used} tokens (its text and the video's), which fills the model's {limit} "
                           "positions: shorten 'messages' or send fewer or smaller frames", "context_length_exceeded")
    return prepared, min(max_tokens, limit - used)


class Reply:
    """One answer as an OpenAI chat completion, whole or as server-sent event chunks."""

    def __init__(self, model: str):
        self.model = model
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    @staticmethod
    def finish_reason(answer: dict) -> str:
        return "length" if answer.get("truncated") == "true" else "stop"

    @staticmethod
    def usage(answer: dict) -> dict:
        prompt, completion = answer["prompt_tokens"], answer["completion_tokens"]
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def completion(self, answer: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer["text"]},
                             "finish_reason": self.finish_reason(answer)}],
                "usage": self.usage(answer)}

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

    async def stream(self, request: web.Request, prepared: Prepared, options: dict, key: Any,
                     include_usage: bool) -> web.StreamResponse:
        """The reply as SSE chunks, a delta per token as generation picks it (beam search: the whole text at
        the end). The response starts with the first text, so a request that fails before any still gets
        its 4xx error."""
        engine: Engine = request.app[ENGINE]
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int] = asyncio.Queue()
        if engine.streams_tokens(options):
            prepared = replace(prepared, on_token=lambda token: loop.call_soon_threadsafe(tokens.put_nowait, token))
        answer = asyncio.ensure_future(_answer(request.app[BATCHER].submit(prepared, options, key)))
        text = engine.text_stream()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

        async def send(chunk: dict) -> None:
            if not response.prepared:
                await response.prepare(request)
                await response.write(self._event(self._chunk({"role": "assistant", "content": ""})))
            await response.write(self._event(chunk))

        async def send_text(delta: str) -> None:
            if delta:
                await send(self._chunk({"content": delta}))

        try:
            while True:
                token = asyncio.ensure_future(tokens.get())
                done, _ = await asyncio.wait({token, answer}, return_when=asyncio.FIRST_COMPLETED)
                if token not in done:
                    token.cancel()
                    break
                await send_text(text.add(token.result()))
            while not tokens.empty():  # the last tokens came in with the answer
                await send_text(text.add(tokens.get_nowait()))
            result = await answer
            await send_text(text.finish(result["text"]))
            await send(self._chunk({}, self.finish_reason(result)))
            if include_usage:
                await send({**self._chunk({}), "choices": [], "usage": self.usage(result)})
        except ConnectionResetError as exc:  # the client left: a write failed, or the model stopped for it
            if not response.prepared:
                raise
            logger.info("a streamed reply stopped: the client left (%s)", exc)
            return response
        except Exception as exc:  # noqa: BLE001
            if not response.prepared:
                raise
            logger.exception("a streamed reply failed")
            await response.write(self._event({"error": {"message": str(exc), "type": "server_error",
                                                        "code": "generation_failed"}}))
        finally:
            answer.cancel()
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    @staticmethod
    def _event(chunk: dict) -> bytes:
        return f"data: {json.dumps(chunk)}\n\n".encode()


def jpeg_data_url(frame: np.ndarray) -> str:
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(frame[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return "data:image/jpeg;base64," + base64.b64encode(data.tobytes()).decode()


async def frames(request: web.Request) -> web.Response:
    """The frames the model would see of ``{"url": ...}`` (a video; ``"kind": "image"`` for an image)."""
    body = await read_json(request)
    url, kind = body.get("url"), body.get("kind", "video")
    if not isinstance(url, str) or kind not in ("video", "image"):
        raise RequestError("send {\"url\": <data URL or path>, \"kind\": \"video\" or \"image\"}", "invalid_parameter")
    sampled = (await decode_frames(request, [MediaRef(kind, url)])).frames
    return web.json_response({"frames": [jpeg_data_url(f) for f in sampled], "num_frames": len(sampled),
                              "height": int(sampled.shape[1]), "width": int(sampled.shape[2])})


async def models(request: web.Request) -> web.Response:
    name = request.app[SETTINGS].model_name
    return web.json_response({"object": "list", "data": [{"id": name, "object": "model",
                                                          "created": request.app[STARTED], "owned_by": "mscaption"}]})


async def health(request: web.Request) -> web.Response:
    """Liveness plus what clients (the page, tests) read: the model, its default prompt, the batch counter."""
    engine: Engine = request.app[ENGINE]
    return web.json_response({"status": "ok", "model": request.app[SETTINGS].model_name, "family": engine.family,
                              "default_prompt": engine.question, "generate_calls": engine.generate_calls,
                              "max_frames": request.app[SETTINGS].max_frames})


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(PAGE, headers={"Content-Type": "text/html; charset=utf-8"})


def build_app(engine: Engine, settings: Settings, max_body_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes, middlewares=[json_errors, guard])
    app[ENGINE], app[SETTINGS] = engine, settings
    app[STARTED] = int(time.time())
    app[DECODERS] = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
    app[BATCHER] = Batcher(engine.generate, settings.max_batch, settings.batch_wait_s, wanted=Engine.wanted)

    async def lifecycle(app: web.Application):
        app[BATCHER].start()
        if settings.decode_timeout != 0:
            engine.decode_pool, engine.decode_timeout = DecodePool(settings.decode_workers), settings.decode_timeout
        yield
        await app[BATCHER].stop()
        app[DECODERS].shutdown(wait=False, cancel_futures=True)
        if engine.decode_pool is not None:
            engine.decode_pool.close()
            engine.decode_pool = None

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/", page)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/frames", frames)
    return app
