"""OpenAI chat messages -> conversation turns and the media they carry, and media URLs -> files to decode.

A request shows one video: one ``video_url`` part, or ``image_url`` parts that are its frames in
order (as API captioners send sampled frames), all in one user message. URLs are data URLs
(``data:video/mp4;base64,...``, vLLM's convention), local paths under an allowed folder, or
http(s) when the server allows it.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import unquote, urlparse

import aiohttp

from pipeline.captioning.chat import ROLES, Turn
from pipeline.serve.engine import RequestError

MEDIA_PARTS = {"video_url": "video", "image_url": "image"}
SUFFIXES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-msvideo": ".avi",
            "video/x-matroska": ".mkv", "image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp",
            "image/bmp": ".bmp"}


@dataclass(frozen=True)
class MediaRef:
    kind: str  # "video" or "image"
    url: str


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from besides data URLs, and how large it may be."""

    max_bytes: int
    allowed_local_path: Path | None = None
    allow_remote: bool = False
    remote_timeout: float = 30.0


def _text_and_media(content: Any, where: str) -> tuple[str, list[MediaRef]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of parts", "invalid_messages")
    texts, media = [], []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in MEDIA_PARTS:
            value = part.get(kind)
            url = value.get("url") if isinstance(value, dict) else value
            if not isinstance(url, str) or not url:
                raise RequestError(f"{where}.content[{i}].{kind} needs a url", "invalid_messages")
            media.append(MediaRef(MEDIA_PARTS[kind], url))
        else:
            raise RequestError(f"{where}.content[{i}]: parts are text, image_url or video_url, got "
                               f"{str(part)[:80]!r}", "invalid_messages")
    return "\n".join(texts), media


def parse_messages(messages: Any, max_frames: int) -> tuple[list[Turn], list[MediaRef]]:
    """The conversation's turns (the media's user turn marked) and that turn's media."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "invalid_messages")
    turns: list[Turn] = []
    shown: list[MediaRef] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(f"{where} needs a role ({', '.join(ROLES)})", "invalid_messages")
        text, media = _text_and_media(message.get("content", ""), where)
        if media and (message["role"] != "user" or shown):
            raise RequestError(f"{where}: media may come in one user message only (a video, or its frames as "
                               "images)", "invalid_messages")
        shown = shown or media
        turns.append(Turn(message["role"], text, media=bool(media)))
    kinds = {ref.kind for ref in shown}
    if kinds == {"video", "image"} or sum(ref.kind == "video" for ref in shown) > 1:
        raise RequestError("a conversation shows one video, or images as its frames, not both or several videos",
                           "invalid_messages")
    if len(shown) > max_frames:
        raise RequestError(f"{len(shown)} images are more frames than this server's limit of {max_frames}",
                           "too_many_frames")
    return turns, shown


def decode_data_url(url: str) -> tuple[str, bytes]:
    """(mime type, bytes) of a base64 data URL."""
    header, sep, payload = url[5:].partition(",")
    params = header.split(";")  # e.g. video/mp4;codecs=avc1;base64
    mime = params[0]
    if not sep or params[-1] != "base64":
        raise RequestError("a data URL must be data:<type>;base64,<data>", "invalid_media")
    try:
        return mime.lower(), base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"the data URL's base64 is broken: {exc}", "invalid_base64") from exc


def _suffix(mime: str) -> str:
    """A file suffix for the decoder: a still image must end as one; containers are found by content."""
    return SUFFIXES.get(mime) or (".png" if mime.startswith("image/") else ".mp4")


def _local(url: str, policy: MediaPolicy) -> Path:
    path = Path(unquote(urlparse(url).path) if url.startswith("file:") else url)
    if policy.allowed_local_path is None:
        raise RequestError("local media paths are off; the server allows them under --allowed_local_media_path",
                           "local_media_not_allowed", 403)
    resolved = path.resolve()
    if not resolved.is_relative_to(policy.allowed_local_path):
        raise RequestError(f"{path} is outside the allowed media folder", "local_media_not_allowed", 403)
    if not resolved.is_file():
        raise RequestError(f"no such media file: {path}", "invalid_media")
    return resolved


async def _remote(url: str, policy: MediaPolicy) -> tuple[str, bytes]:
    if not policy.allow_remote:
        raise RequestError("http(s) media URLs are off; start the server with --allow_remote_media",
                           "remote_media_not_allowed", 403)
    timeout = aiohttp.ClientTimeout(total=policy.remote_timeout)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
            if response.status != 200:
                raise RequestError(f"fetching {url} gave HTTP {response.status}", "invalid_media")
            data = bytearray()
            async for chunk in response.content.iter_chunked(1 << 16):
                data += chunk
                if len(data) > policy.max_bytes:
                    raise RequestError(f"{url} is larger than the {policy.max_bytes} byte limit",
                                       "media_too_large", 413)
            mime = response.content_type
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RequestError(f"fetching {url} failed: {exc}", "invalid_media") from exc
    return mime, bytes(data)


async def materialise(refs: Sequence[MediaRef], policy: MediaPolicy, folder: Path) -> list[Path]:
    """Each media reference as a file to decode: data URLs and downloads written into ``folder``."""
    paths = []
    for i, ref in enumerate(refs):
        if ref.url.startswith("data:"):
            mime, data = decode_data_url(ref.url)
        elif ref.url.startswith(("http://", "https://")):
            mime, data = await _remote(ref.url, policy)
        else:
            paths.append(_local(ref.url, policy))
            continue
        if not data:
            raise RequestError("the media is empty", "invalid_media")
        path = folder / f"media{i}{_suffix(mime)}"
        path.write_bytes(data)
        paths.append(path)
    return paths
