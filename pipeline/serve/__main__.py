"""``python -m pipeline.serve --pretrained_model_name_or_path DIR``: serve one checkpoint over HTTP."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from aiohttp import web

from models.checkpoint import CheckpointError
from pipeline.config import CONFIG_DIR, ConfigError, apply_config
from pipeline.serve.app import Settings, build_app
from pipeline.serve.engine import FAMILY_FLAGS_EPILOG, Engine, add_model_flags
from pipeline.serve.media import MediaPolicy

BASE_CONFIG = CONFIG_DIR / "serve.yaml"
API_KEY_ENV = "MSCAPTION_API_KEY"
logger = logging.getLogger("pipeline.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.serve",
        description="Serve a captioning checkpoint with OpenAI's API: GET /v1/models, POST /v1/chat/completions "
                    "(text, image_url and video_url parts; stream), POST /v1/frames (the sampled frames), "
                    "GET /health, and a chat page at /.",
        epilog=f"defaults come from {BASE_CONFIG.relative_to(CONFIG_DIR.parent)}\n{FAMILY_FLAGS_EPILOG}\n"
               "example:\n  python -m pipeline.serve --pretrained_model_name_or_path /models/Qwen2-VL-2B-Instruct "
               "--num_frames 8",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--served_model_name", help="the model's id in /v1/models and requests (default: the folder's name)")
    p.add_argument("--host", help="address to listen on (default: %(default)s; 0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, help="TCP port (default: %(default)s)")
    p.add_argument("--max_body_mb", type=float, help="largest request body in MiB; larger get 413 (default: %(default)s)")
    p.add_argument("--max_frames", type=int,
                   help="most frames per request: images given as frames, and frames an fps-sampled video keeps "
                        "(evenly spread) (default: %(default)s)")
    p.add_argument("--max_tokens", type=int,
                   help="cap on a request's max_tokens (a request without one gets the model's --max_new_tokens, "
                        "within this cap) (default: %(default)s)")
    p.add_argument("--max_batch", type=int, help="most requests in one generate call (default: %(default)s)")
    p.add_argument("--batch_wait_ms", type=float,
                   help="how long a waiting request waits for others to share its generate call "
                        "(default: %(default)s)")
    p.add_argument("--decode_workers", type=int, help="processes decoding videos, and threads reading images and "
                                                      "preparing model inputs (default: %(default)s)")
    p.add_argument("--decode_timeout", type=float,
                   help="seconds one video's decoding may take before its decoder process is stopped and the "
                        "request gets a 400 (default: 120, plus 120 per 32 frames above 32); 0: decode in threads, "
                        "with no limit")
    p.add_argument("--allowed_local_media_path", metavar="DIR",
                   help="allow media URLs that are local paths (or file://) inside DIR (default: none allowed)")
    p.add_argument("--allow_remote_media", action="store_true",
                   help="allow http(s) media URLs, fetched by the server (default: data URLs only); never from "
                        "loopback, private, link-local, multicast or reserved addresses unless allowed below, "
                        "never from cloud metadata addresses")
    p.add_argument("--allowed_media_domains", nargs="+", metavar="HOST", default=[],
                   help="with --allow_remote_media: fetch only from these hosts (names or addresses, exact), which "
                        "may then be at private addresses too (an internal media server)")
    p.add_argument("--allowed_media_networks", nargs="+", metavar="CIDR", default=[],
                   help="with --allow_remote_media: also fetch from private addresses in these networks "
                        "(e.g. 10.2.0.0/16)")
    p.add_argument("--remote_media_timeout", type=float, default=30.0,
                   help="seconds one remote media fetch may take, redirects included (default: %(default)s); "
                        "its size is limited by --max_body_mb")
    p.add_argument("--max_request_pixels", type=int, default=2 ** 26,
                   help="most pixels (width x height, from the headers) the images of one request may have; more "
                        "get a 400. Each image is also scaled down to the family's --max_decode_pixels while it is "
                        "decoded (default: %(default)s, e.g. 32 full-HD frames or one 8192 x 8192 image)")
    p.add_argument("--api_key", "--api-key", metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every /v1 request (default: the {API_KEY_ENV} "
                        "environment variable, which keeps the key out of the process list; unset: no key)")
    p.add_argument("--allowed_hosts", nargs="+", metavar="NAME", default=[],
                   help="Host header names the server answers to besides the address it listens on (with "
                        "localhost, 127.0.0.1 and [::1] on loopback): names it is reached by behind a proxy; "
                        "'*' answers any Host (requests from other sites' pages are still refused)")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    for name in ("max_frames", "max_tokens", "max_batch", "decode_workers"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.batch_wait_ms < 0 or args.max_body_mb <= 0 or (args.decode_timeout or 0) < 0:
        raise ConfigError("--batch_wait_ms and --decode_timeout must be 0 or more and --max_body_mb positive")
    local = None
    if args.allowed_local_media_path:
        local = Path(args.allowed_local_media_path).resolve()
        if not local.is_dir():
            raise ConfigError(f"--allowed_local_media_path {local} is not a folder")
    if (args.allowed_media_domains or args.allowed_media_networks) and not args.allow_remote_media:
        raise ConfigError("--allowed_media_domains and --allowed_media_networks need --allow_remote_media")
    if args.remote_media_timeout <= 0 or args.max_request_pixels < 1:
        raise ConfigError("--remote_media_timeout and --max_request_pixels must be positive")
    try:
        networks = tuple(ipaddress.ip_network(n, strict=False) for n in args.allowed_media_networks)
    except ValueError as exc:
        raise ConfigError(f"--allowed_media_networks: {exc}") from exc
    name = args.served_model_name or Path(args.pretrained_model_name_or_path).resolve().name
    media = MediaPolicy(max_bytes=int(args.max_body_mb * 2 ** 20), allowed_local_path=local,
                        allow_remote=args.allow_remote_media, remote_timeout=args.remote_media_timeout,
                        allowed_domains=frozenset(d.lower() for d in args.allowed_media_domains),
                        allowed_networks=networks, max_pixels=args.max_request_pixels)
    hosts = {h.lower().strip("[]") for h in args.allowed_hosts}
    if args.host and _address(args.host) is None:
        hosts.add(args.host.lower())  # a name given to listen on is one the server is reached by
    return Settings(model_name=name, max_tokens=args.max_tokens, max_frames=args.max_frames,
                    max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000,
                    decode_workers=args.decode_workers, media=media, decode_timeout=args.decode_timeout,
                    api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, allowed_hosts=frozenset(hosts))


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _loopback(host: str) -> bool:
    address = _address(host)
    return host == "localhost" or (address is not None and address.is_loopback)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    try:
        apply_config(parser, BASE_CONFIG)
        args, family_argv = parser.parse_known_args(argv)
        settings = settings_from(args)
        engine = Engine.load(args.pretrained_model_name_or_path, family_argv, args.device, args.dtype)
        engine.limit_frames(settings.max_frames)
    except (ConfigError, CheckpointError, OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    app = build_app(engine, settings, settings.media.max_bytes)
    if settings.api_key is None and not _loopback(args.host):
        logger.warning("listening on %s without an API key: anyone who reaches it can use the model "
                       "(set --api_key or %s)", args.host, API_KEY_ENV)
    logger.info("serving %s on http://%s:%d", settings.model_name, args.host, args.port)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
