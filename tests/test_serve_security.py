"""The server's defences (issue 28): the API key, the Host and Origin checks, the remote media policy,
images decoded in bounded memory, and 4xx answers for requests the model cannot take.

Servers run on 127.0.0.1 as in tests/test_serve.py (its fixtures and helpers are imported); the media
servers they fetch from are local ``http.server``s, on 127.0.0.1 and 127.0.0.2.
"""
from __future__ import annotations

import base64
import functools
import http.server
import ipaddress
import json
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import unquote

import cv2
import numpy as np
import pytest
import requests
from PIL import Image

from pipeline.config import apply_config
from pipeline.serve import media
from pipeline.serve.__main__ import API_KEY_ENV, BASE_CONFIG, build_parser, settings_from
from pipeline.serve.app import prepare_within_context, prompt_tokens
from pipeline.serve.engine import RequestError
from pipeline.serve.media import MediaPolicy, address_allowed, fit_images
from tests.test_serve import (FAMILY_ARGV, ThreadServer, checkpoints, chromium, complete,  # noqa: F401 - fixtures
                              data_url, engines, free_port, video_message, videos)

KEY = "sk-test-0123456789"
BIG_MEDIA = 2 ** 24  # request bodies and downloads up to 16 MiB


def frames_of(url: str, media_url: str, kind: str = "video", **headers) -> requests.Response:
    return requests.post(f"{url}/v1/frames", json={"url": media_url, "kind": kind}, headers=headers, timeout=120)


def assert_error(response: requests.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error", error
    return error["message"]


# ----------------------------------------------------------------------------- API key, Host, Origin

def test_the_api_key_guards_every_v1_path(engines, videos):
    good = data_url(videos / "v0.mp4")
    with ThreadServer(engines("qwen2_vl"), api_key=KEY) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
            refused = requests.get(f"{url}/v1/models", headers=headers, timeout=10)
            assert "API key" in assert_error(refused, 401, "invalid_api_key")
            assert refused.headers["WWW-Authenticate"] == "Bearer"
        assert_error(frames_of(url, good), 401, "invalid_api_key")
        assert_error(complete(url, {"messages": [video_message(good)]}), 401, "invalid_api_key")
        assert_error(requests.get(f"{url}/v1/nothing", timeout=10), 401, "invalid_api_key")
        bearer = {"Authorization": f"Bearer {KEY}"}
        assert requests.get(f"{url}/v1/models", headers=bearer, timeout=10).json()["data"][0]["id"] == "tiny"
        assert frames_of(url, good, **bearer).json()["num_frames"] == 4
        assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"  # liveness and the page stay open
        assert "api-key" in requests.get(f"{url}/", timeout=10).text


def test_the_api_key_comes_from_either_flag_or_the_environment(monkeypatch, tmp_path):
    parser = build_parser()
    apply_config(parser, BASE_CONFIG)
    base = ["--pretrained_model_name_or_path", str(tmp_path)]

    def key(*flags: str) -> str | None:
        return settings_from(parser.parse_known_args(base + list(flags))[0]).api_key

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert key() is None
    assert key("--api_key", "k1") == "k1" and key("--api-key", "k1") == "k1"
    monkeypatch.setenv(API_KEY_ENV, "k2")
    assert key() == "k2" and key("--api-key", "k1") == "k1"
    text = parser.format_help()
    for flag in ("--api_key", "--allowed_hosts", "--allowed_media_domains", "--allowed_media_networks",
                 "--remote_media_timeout", "--max_request_pixels", API_KEY_ENV):
        assert flag in text, flag


def test_foreign_hosts_and_cross_origin_requests_are_refused(engines, videos):
    """A page elsewhere (another Origin) or a name rebound to 127.0.0.1 (another Host) cannot drive the server,
    nor can a text/plain POST, which browsers send without asking the server first."""
    body = {"url": data_url(videos / "v0.mp4")}
    with ThreadServer(engines("qwen2_vl"), allowed_hosts=frozenset({"captions.example"})) as url:
        port = int(url.rsplit(":", 1)[1])
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}",
                     "captions.example"):
            assert requests.get(f"{url}/v1/models", headers={"Host": host}, timeout=10).status_code == 200, host
        for host in (f"attacker.example:{port}", f"127.0.0.1:{port + 1}", "127.0.0.1", f"10.0.0.1:{port}", ""):
            rebound = requests.post(f"{url}/v1/frames", json=body, timeout=10,
                                    headers={"Host": host, "Origin": f"http://{host}"})
            assert "Host" in assert_error(rebound, 400, "invalid_host"), host
        assert_error(requests.get(f"{url}/", headers={"Host": "attacker.example"}, timeout=10), 400, "invalid_host")
        for origin in ("http://attacker.example", f"http://127.0.0.1:{port + 1}", f"http://localhost:{port}",
                       "null"):
            foreign = requests.post(f"{url}/v1/frames", data=json.dumps(body), timeout=10,
                                    headers={"Content-Type": "text/plain", "Origin": origin})
            assert "cross-origin" in assert_error(foreign, 403, "cross_origin_refused"), origin
        plain = requests.post(f"{url}/v1/frames", data=json.dumps(body), headers={"Content-Type": "text/plain"},
                              timeout=10)
        assert "application/json" in assert_error(plain, 415, "unsupported_media_type")
        untyped = requests.post(f"{url}/v1/frames", data=json.dumps(body), headers={"Origin": url}, timeout=10)
        assert_error(untyped, 415, "unsupported_media_type")  # a browser's Blob body carries no type
        assert frames_of(url, body["url"], Origin=url).status_code == 200  # the server's own page
        assert frames_of(url, body["url"], Origin="https://captions.example").status_code == 200  # behind a proxy
        assert requests.post(f"{url}/v1/frames", data=json.dumps(body), timeout=60).status_code == 200  # curl-like


def test_the_chat_page_sends_the_api_key_it_is_given_in_chromium(engines, videos):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-test.txt")
    executable = chromium()
    with ThreadServer(engines("qwen2_vl"), api_key=KEY) as url, sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.set_input_files("#video-file", str(videos / "v1.mp4"))
            page.wait_for_function("document.getElementById('status').textContent.includes('API key')",
                                   timeout=60000)
            page.fill("#api-key", KEY)
            page.set_input_files("#video-file", str(videos / "v2.mp4"))
            page.wait_for_function("document.querySelectorAll('#frames img').length === 4", timeout=60000)
            page.click("#caption-btn")
            page.wait_for_function("document.getElementById('caption').textContent.trim().length > 0",
                                   timeout=120000)
            assert page.text_content("#status") == ""
            page.reload()
            assert page.input_value("#api-key") == KEY  # kept in this browser for this server
        finally:
            browser.close()


# ----------------------------------------------------------------------------- remote media

class MediaHandler(http.server.SimpleHTTPRequestHandler):
    """Files of a folder, ``/redirect?to=URL`` (a 302 there) and ``/loop`` (a redirect to itself); every
    request path is kept in ``self.server.hits``."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.hits.append(self.path)
        target = unquote(self.path.split("to=", 1)[1]) if self.path.startswith("/redirect?to=") else \
            "/loop" if self.path == "/loop" else None
        if target is None:
            super().do_GET()
            return
        self.send_response(302)
        self.send_header("Location", target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@contextmanager
def media_server(folder: Path, host: str = "127.0.0.1") -> Iterator[tuple[str, list[str]]]:
    """(base URL, paths requested) of a file server on ``host``."""
    server = http.server.ThreadingHTTPServer((host, 0), functools.partial(MediaHandler, directory=str(folder)))
    server.hits = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{host}:{server.server_port}", server.hits
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("address, allowed", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("127.0.0.2", False), ("::1", False), ("0.0.0.0", False), ("::", False),
    ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("100.64.0.1", False),
    ("169.254.169.254", False), ("169.254.1.1", False), ("fe80::1", False), ("fd00:ec2::254", False),
    ("fc00::1", False), ("224.0.0.1", False), ("239.1.1.1", False), ("ff0e::1", False), ("240.0.0.1", False),
    ("255.255.255.255", False), ("192.0.2.1", False), ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True),
    ("2002:7f00:1::1", False), ("64:ff9b::a00:1", False), ("64:ff9b::808:808", True)])
def test_which_addresses_remote_media_may_come_from(address, allowed):
    ip = ipaddress.ip_address(address)
    policy = MediaPolicy(max_bytes=1, allow_remote=True)
    assert address_allowed(ip, policy) is allowed
    networks = MediaPolicy(max_bytes=1, allow_remote=True,
                           allowed_networks=(ipaddress.ip_network("10.0.0.0/8"),
                                             ipaddress.ip_network("169.254.0.0/16")))
    in_networks = address in ("10.1.2.3", "169.254.1.1", "64:ff9b::a00:1")  # the last one leads to 10.0.0.1
    assert address_allowed(ip, networks) is (allowed or in_networks)
    assert address_allowed(ip, policy, named=True) is (address not in ("169.254.169.254", "fd00:ec2::254"))


def test_remote_media_on_local_addresses_is_refused_with_one_message(engines, videos):
    """By default nothing local is fetched, however it is spelled, and a refused address, a closed port and
    cloud metadata all get the same answer, so errors do not map the server's network."""
    policy = MediaPolicy(max_bytes=BIG_MEDIA, allow_remote=True)
    with media_server(videos) as (files, hits), ThreadServer(engines("qwen2_vl"), media=policy) as url:
        port = int(files.rsplit(":", 1)[1])
        closed = free_port()
        urls = [f"{files}/v1.mp4", f"http://localhost:{port}/v1.mp4", f"http://2130706433:{port}/v1.mp4",
                f"http://[::ffff:127.0.0.1]:{port}/v1.mp4", f"http://127.0.0.1:{closed}/v1.mp4",
                "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/latest/meta-data/"]
        messages = {assert_error(frames_of(url, u), 400, "media_fetch_failed") for u in urls}
    assert len(messages) == 1 and not re.search(r"\d{2,}", messages.pop())  # no address, port or status
    assert hits == []


def test_redirects_are_checked_hop_by_hop_and_fetches_go_to_the_checked_address(engines, videos, monkeypatch):
    """``media.test`` resolves (only here) to 127.0.0.1, which the allow-list trusts by name: fetching from it
    works, so the connection used the checked address rather than resolving the name again; a redirect from
    it to a host the list does not name is refused without being followed."""
    resolved = []
    real = media.resolve_host

    async def resolve(host: str, port: int):
        resolved.append(host)
        return [ipaddress.ip_address("127.0.0.1")] if host == "media.test" else await real(host, port)

    monkeypatch.setattr(media, "resolve_host", resolve)
    policy = MediaPolicy(max_bytes=BIG_MEDIA, allow_remote=True, allowed_domains=frozenset({"media.test"}))
    with media_server(videos) as (files, hits), media_server(videos) as (other, other_hits), \
            ThreadServer(engines("qwen2_vl"), media=policy) as url:
        named = files.replace("127.0.0.1", "media.test")
        assert frames_of(url, f"{named}/v1.mp4").json()["num_frames"] == 4
        assert frames_of(url, f"{named}/redirect?to=/v2.mp4").json()["num_frames"] == 4
        for target in (f"{other}/v1.mp4", other.replace("127.0.0.1", "localhost") + "/v1.mp4"):
            assert_error(frames_of(url, f"{named}/redirect?to={target}"), 400, "media_fetch_failed")
        assert_error(frames_of(url, f"{other}/v1.mp4"), 400, "media_fetch_failed")  # not named
    assert other_hits == [] and hits.count("/v1.mp4") == 1
    assert set(resolved) == {"media.test"}


def test_allowed_networks_redirect_limits_and_download_limits(engines, videos):
    """127.0.0.1/32 allowed: its server is fetched from, a redirect from it to 127.0.0.2 is not followed, a
    redirect loop ends, a download over the size limit gets 413 and one that never answers gets the one
    error after --remote_media_timeout."""
    policy = MediaPolicy(max_bytes=BIG_MEDIA, allow_remote=True, remote_timeout=2, max_redirects=3,
                         allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    with silent, media_server(videos) as (files, hits), media_server(videos, "127.0.0.2") as (other, other_hits), \
            ThreadServer(engines("qwen2_vl"), media=policy) as url:
        assert frames_of(url, f"{files}/redirect?to={files}/v1.mp4").json()["num_frames"] == 4
        assert_error(frames_of(url, f"{files}/redirect?to={other}/v1.mp4"), 400, "media_fetch_failed")
        assert_error(frames_of(url, f"{files}/loop"), 400, "media_fetch_failed")
        assert hits.count("/loop") == 4  # the first request and 3 redirects
        started = time.monotonic()
        assert_error(frames_of(url, f"http://127.0.0.1:{silent.getsockname()[1]}/v1.mp4"), 400, "media_fetch_failed")
        assert time.monotonic() - started < 30
    small = MediaPolicy(max_bytes=1000, allow_remote=True, allowed_networks=policy.allowed_networks)
    with media_server(videos) as (files, _), ThreadServer(engines("qwen2_vl"), media=small) as url:
        assert "1000 byte" in assert_error(frames_of(url, f"{files}/v1.mp4"), 413, "media_too_large")
    assert other_hits == []


# ----------------------------------------------------------------------------- images in bounded memory

def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_rise_mb(action: Callable[[], requests.Response]) -> tuple[requests.Response, float]:
    """``action``'s response and how far this process's peak resident memory rose above its memory before
    (Linux: VmHWM, reset first through /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("the peak resident memory cannot be reset here (/proc/self/clear_refs)")
    before = _status_kib("VmRSS")
    response = action()
    return response, (_status_kib("VmHWM") - before) / 1024


def encoded(kind: str, height: int, width: int, rgb=(40, 160, 220)) -> str:
    """A one-colour image as a data URL (large images compress to little)."""
    ok, data = cv2.imencode(f".{kind}", np.full((height, width, 3), rgb[::-1], np.uint8))
    assert ok
    return f"data:image/{kind};base64," + base64.b64encode(data.tobytes()).decode()


def test_large_images_are_scaled_down_while_decoding_in_bounded_memory(engines):
    """A 48-megapixel JPEG decodes at a fraction of its size in the decoder: the server's peak memory
    rises by far less than the 144 MB of its full-size pixels."""
    jpeg = encoded("jpeg", 6000, 8000)
    with ThreadServer(engines("qwen2_vl"), media=MediaPolicy(max_bytes=BIG_MEDIA)) as url:
        assert frames_of(url, encoded("png", 60, 80), "image").status_code == 200  # threads and imports warm
        response, rise = peak_rise_mb(lambda: frames_of(url, jpeg, "image"))
    assert response.status_code == 200, response.text
    frame = cv2.imdecode(np.frombuffer(base64.b64decode(response.json()["frames"][0].split(",")[1]), np.uint8),
                         cv2.IMREAD_COLOR)[..., ::-1]
    assert np.abs(frame.astype(int) - (40, 160, 220)).max() < 12
    assert rise < 100, f"peak memory rose by {rise:.0f} MB"


def test_a_request_over_the_pixel_limit_is_refused_before_decoding(engines):
    """Two 64-megapixel PNGs (200 kB each) are more than the default 2**26 pixels a request may carry: the
    headers say so, and nothing is decoded."""
    png = encoded("png", 8000, 8000)
    content = [{"type": "image_url", "image_url": {"url": png}}] * 2 + [{"type": "text", "text": "what"}]
    with ThreadServer(engines("qwen2_vl"), media=MediaPolicy(max_bytes=BIG_MEDIA)) as url:
        response, rise = peak_rise_mb(lambda: complete(url, {"messages": [{"role": "user", "content": content}]}))
        message = assert_error(response, 400, "too_many_pixels")
        assert "--max_request_pixels" in message and str(2 ** 26) in message and str(2 * 8000 * 8000) in message
        assert rise < 50, f"peak memory rose by {rise:.0f} MB"
        one = frames_of(url, png, "image")  # one of them is within the limit: decoded, then scaled down
    assert one.status_code == 200, one.text


def test_fit_images_scales_large_images_upright_and_leaves_small_ones(tmp_path):
    """A 3000 x 1000 JPEG whose EXIF turns it a quarter (orientation 6) comes out upright (1000 wide, red on
    top) within the pixel limit; an image within it is passed on as it is."""
    pixels = np.zeros((1000, 3000, 3), np.uint8)
    pixels[:, :1500] = (255, 0, 0)
    pixels[:, 1500:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    Image.fromarray(pixels[:10, :30]).save(tmp_path / "small.png")
    policy = MediaPolicy(max_bytes=1)
    scaled, small = fit_images([tmp_path / "turned.jpg", tmp_path / "small.png"], policy, 30_000, tmp_path)
    assert small == tmp_path / "small.png" and scaled != tmp_path / "turned.jpg"
    image = cv2.imread(str(scaled))[..., ::-1]
    height, width = image.shape[:2]
    assert height * width <= 30_000 and 2.9 < height / width < 3.1
    assert image[5, width // 2].argmax() == 0 and image[-5, width // 2].argmax() == 2  # red on top, blue below
    upright = cv2.imread(str(tmp_path / "turned.jpg"))  # OpenCV applies EXIF orientation too
    assert upright.shape[0] / upright.shape[1] == 3
    with pytest.raises(RequestError, match="max_request_pixels"):
        fit_images([tmp_path / "turned.jpg"], MediaPolicy(max_bytes=1, max_pixels=2_999_999), None, tmp_path)


# ----------------------------------------------------------------------------- requests the model cannot take

def test_non_finite_numbers_bad_stream_options_and_min_tokens_get_400(engines, videos):
    good = [video_message(data_url(videos / "v0.mp4"))]
    with ThreadServer(engines("qwen2_vl")) as url:
        for field, raw in [("max_tokens", "NaN"), ("max_tokens", "Infinity"), ("max_tokens", "-Infinity"),
                           ("max_completion_tokens", "NaN"), ("temperature", "NaN"), ("top_p", "Infinity"),
                           ("min_tokens", "Infinity"), ("seed", "NaN")]:
            response = requests.post(f"{url}/v1/chat/completions", timeout=60,
                                     headers={"Content-Type": "application/json"},
                                     data=f'{{"{field}": {raw}, "messages": {json.dumps(good)}}}')
            assert f"'{field}'" in assert_error(response, 400, "invalid_parameter"), (field, raw)
        for value in ("yes", ["include_usage"], 1, True, []):
            response = complete(url, {"stream": True, "stream_options": value, "messages": good})
            assert "'stream_options'" in assert_error(response, 400, "invalid_parameter"), value
        for body in ({"max_tokens": 4, "min_tokens": 5}, {"min_tokens": 33}):  # the server's cap is 32
            assert "'min_tokens'" in assert_error(complete(url, {**body, "messages": good}), 400, "invalid_parameter")
        streamed = complete(url, {"max_tokens": 2, "stream": True, "stream_options": None, "messages": good})
        assert streamed.status_code == 200


def test_a_prompt_past_the_models_positions_gets_400_and_a_reply_stops_at_its_end(engines, videos):
    """BLIP-2 with the tiny OPT (64 learned positions, once a Gather crash): a question filling them is
    refused, one leaving 3 positions gets a reply of at most 3 tokens, and min_tokens above that is refused."""
    engine = engines("blip2")
    limit = engine.captioner.model.config.text_config.max_position_embeddings
    video = data_url(videos / "v0.mp4")

    def ask(words: int, **options) -> requests.Response:
        return complete(url, {**options, "messages": [video_message(video, " ".join(["red"] * words))]})

    with ThreadServer(engine) as url:
        message = assert_error(ask(limit), 400, "context_length_exceeded")
        assert f"{limit} positions" in message and "'messages'" in message
        prompt = ask(1, max_tokens=1).json()["usage"]["prompt_tokens"]  # one word of the question: 1 token
        words = limit - 3 - prompt + 1
        near = ask(words, max_tokens=6)
        assert near.status_code == 200, near.text
        usage = near.json()["usage"]
        assert usage["prompt_tokens"] == limit - 3 and usage["completion_tokens"] <= 3
        assert "'min_tokens'" in assert_error(ask(words, max_tokens=6, min_tokens=4), 400, "invalid_parameter")
        assert complete(url, {"messages": [video_message(video)]}).status_code == 200


@pytest.mark.parametrize("family", list(FAMILY_ARGV))
def test_the_prompt_length_checked_is_the_one_generate_reports(family, engines, videos):
    """The length checked before generating (each family's own prompt building) is the ``prompt_tokens``
    its generate call reports, for a two-turn conversation."""
    from pipeline.captioning.chat import Turn

    engine = engines(family)
    turns = [Turn("user", "what is shown", media=True), Turn("assistant", "a red square"),
             Turn("user", "what moves")]
    prepared, room = prepare_within_context(engine, engine.video_frames(videos / "v1.mp4"), turns, 2)
    assert room == 2
    answer = engine.generate([prepared], engine.options(2))[0]
    assert prompt_tokens(engine, prepared) == answer["prompt_tokens"]
