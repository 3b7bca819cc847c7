"""OpenAI chat messages -> conversation turns and the media they carry, and media URLs -> files to decode.

A request shows one video: one ``video_url`` part, or ``image_url`` parts that are its frames in
order (as API captioners send sampled frames), all in one user message. URLs are data URLs
(``data:video/mp4;base64,...``, vLLM's convention), local paths under an allowed folder, or
http(s) when the server allows it.

A remote fetch must not let a client reach what only the server can: each host name is resolved once,
every address it gives is checked (no loopback, private, link-local, multicast or reserved address unless
an allow-list names it, never a cloud metadata service) and the connection goes to those checked
addresses, so a second DNS answer cannot swap them; redirects are followed one hop at a time under the
same check. Every failure gets one message, so errors do not tell which hosts or ports answer.
Images are measured from their headers before any decoding and scaled down while decoding, so a
request's memory is bounded by its pixel limit, not by what its images claim.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import unquote, urlparse

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image, ImageOps
from yarl import URL

from pipeline.captioning.chat import ROLES, Turn
from pipeline.datasets.video import _capped_size
from pipeline.serve.engine import RequestError

logger = logging.getLogger(__name__)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MEDIA_PARTS = {"video_url": "video", "image_url": "image"}
SUFFIXES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-msvideo": ".avi",
            "video/x-matroska": ".mkv", "image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp",
            "image/bmp": ".bmp"}
REDIRECTS = frozenset({301, 302, 303, 307, 308})
FETCH_FAILED = ("could not fetch the media URL (it is unreachable, did not answer with the media, or the "
                "server's media policy refuses it)")
# Cloud instance-metadata services (AWS, GCP and Azure at 169.254.169.254, AWS's IPv6 one, Alibaba's):
# refused even when an allowed network or host would take them in.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254",
                                                                 "100.100.100.200"))
NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class MediaRef:
    kind: str  # "video" or "image"
    url: str


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from besides data URLs, and how large it may be.

    ``allowed_domains``: when set, the only hosts fetched from, and trusted at any address (an internal
    media server); ``allowed_networks``: private networks fetched from like public addresses.
    ``max_pixels``: the most pixels the images of one request may have, by their headers.
    """

    max_bytes: int
    allowed_local_path: Path | None = None
    allow_remote: bool = False
    remote_timeout: float = 30.0
    allowed_domains: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()
    max_redirects: int = 5
    max_pixels: int = 2 ** 26


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


def _embedded_ipv4(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), which is where it leads."""
    if ip.version == 4:
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def address_allowed(ip: IPAddress, policy: MediaPolicy, named: bool = False) -> bool:
    """Whether the server may fetch from ``ip``: a public unicast address, one in an allowed network, or
    any address of a host the allow-list names (``named``); a cloud metadata service never."""
    target = _embedded_ipv4(ip)
    if ip in METADATA_ADDRESSES or target in METADATA_ADDRESSES:
        return False
    if named or any(target in net or ip in net for net in policy.allowed_networks):
        return True
    return ip.is_global and target.is_global and not ip.is_multicast and not target.is_multicast


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` (a name or an address literal) stands for."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


class _Refused(Exception):
    """A fetch the policy refuses or that failed; its detail goes to the debug log, never to the client."""


class _Pinned(AbstractResolver):
    """Hands aiohttp the addresses already checked, so the connection goes where the check looked."""

    def __init__(self, host: str, addresses: Sequence[IPAddress]):
        self.host, self.addresses = host, addresses

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        if host != self.host:
            raise OSError(f"{host} was not checked")
        return [ResolveResult(hostname=host, host=str(ip), port=port, proto=0, flags=socket.AI_NUMERICHOST,
                              family=socket.AF_INET6 if ip.version == 6 else socket.AF_INET)
                for ip in self.addresses]

    async def close(self) -> None:
        pass


async def _checked_addresses(url: URL, policy: MediaPolicy) -> list[IPAddress]:
    if url.scheme not in ("http", "https") or not url.host:
        raise _Refused(f"{url} is not an http(s) URL with a host")
    host = url.host.lower()
    named = host in policy.allowed_domains
    if policy.allowed_domains and not named:
        raise _Refused(f"{host} is not in --allowed_media_domains")
    addresses = await resolve_host(url.raw_host, url.port)
    refused = [str(ip) for ip in addresses if not address_allowed(ip, policy, named)]
    if refused or not addresses:
        raise _Refused(f"{host} resolves to {refused or 'no address'}, which the media policy refuses")
    return addresses


async def _fetch(url: URL, policy: MediaPolicy) -> tuple[str, bytes]:
    """The media behind ``url``, each redirect hop resolved, checked and connected to by its checked address."""
    for _ in range(policy.max_redirects + 1):
        addresses = await _checked_addresses(url, policy)
        connector = aiohttp.TCPConnector(resolver=_Pinned(url.raw_host, addresses), use_dns_cache=False)
        async with aiohttp.ClientSession(connector=connector) as session, \
                session.get(url, allow_redirects=False) as response:
            if response.status in REDIRECTS:
                url = url.join(URL(response.headers.get("Location", "")))
                continue
            if response.status != 200:
                raise _Refused(f"{url} answered HTTP {response.status}")
            if (response.content_length or 0) > policy.max_bytes:
                raise RequestError(f"the media is larger than the {policy.max_bytes} byte limit", "media_too_large",
                                   413)
            data = bytearray()
            async for chunk in response.content.iter_chunked(1 << 16):
                data += chunk
                if len(data) > policy.max_bytes:
                    raise RequestError(f"the media is larger than the {policy.max_bytes} byte limit",
                                       "media_too_large", 413)
            return response.content_type, bytes(data)
    raise _Refused(f"more than {policy.max_redirects} redirects")


async def _remote(url: str, policy: MediaPolicy) -> tuple[str, bytes]:
    if not policy.allow_remote:
        raise RequestError("http(s) media URLs are off; start the server with --allow_remote_media",
                           "remote_media_not_allowed", 403)
    try:
        async with asyncio.timeout(policy.remote_timeout):
            return await _fetch(URL(url), policy)
    except RequestError:
        raise
    except (_Refused, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        logger.debug("fetching %s failed: %s", url, exc)
        raise RequestError(FETCH_FAILED, "media_fetch_failed") from None


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


def image_pixels(path: Path) -> int:
    """An image's width x height from its header, without decoding it."""
    try:
        with Image.open(path) as image:
            return image.width * image.height
    except Image.DecompressionBombError as exc:  # Pillow's own ceiling, above any sensible --max_request_pixels
        raise RequestError(f"an image is too large to decode: {exc}", "too_many_pixels") from exc
    except (OSError, ValueError) as exc:
        raise RequestError(f"the media cannot be read as an image: {exc}", "unreadable_media") from exc


def fit_images(paths: Sequence[Path], policy: MediaPolicy, max_pixels: int | None, folder: Path) -> list[Path]:
    """The images, each at most ``max_pixels`` (larger ones scaled down while decoding and written into
    ``folder``), once their headers show the request within ``policy.max_pixels``."""
    sizes = [image_pixels(path) for path in paths]
    if sum(sizes) > policy.max_pixels:
        raise RequestError(f"the images have {sum(sizes)} pixels, more than this server's limit of "
                           f"{policy.max_pixels} per request (--max_request_pixels)", "too_many_pixels")
    if max_pixels is None:
        return list(paths)
    return [path if size <= max_pixels else _scaled(path, max_pixels, folder / f"scaled{i}.bmp")
            for i, (path, size) in enumerate(zip(paths, sizes))]


def _scaled(path: Path, max_pixels: int, out: Path) -> Path:
    """``path`` at most ``max_pixels``, aspect kept and upright: JPEGs decode at 1/2 to 1/8 scale in the
    decoder itself (``draft``), other formats are reduced right after decoding."""
    with Image.open(path) as image:
        height, width = _capped_size(image.height, image.width, max_pixels)
        image.thumbnail((width, height), Image.Resampling.BICUBIC, reducing_gap=1.0)
        ImageOps.exif_transpose(image.convert("RGB")).save(out, "BMP")
    return out
