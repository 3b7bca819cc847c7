"""The OpenAI-compatible server, the terminal chat and the web page, on tiny random checkpoints.

Servers run for real on 127.0.0.1 (in a thread of this process, so its generate counter can be read
beside /health; the page test starts ``python -m pipeline.serve`` itself) and are called over HTTP.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import requests
from aiohttp import web

from pipeline.captioning.chat import Turn
from pipeline.serve.app import Settings, build_app
from pipeline.serve.engine import Engine
from pipeline.serve.media import MediaPolicy
from tests import llava_fixtures
from tests.msrun import kill_when_written
from tests.test_qwen2vl import save_checkpoint as save_qwen2vl
from tests.tiny_models import OPT, save_tiny_blip2
from tests.video_factory import write_caption_clips

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 6
# Each family's flags (its captioning script's), kept small: few frames, few tokens.
FAMILY_ARGV = {
    "qwen2_vl": ["--num_frames", "4", "--height", "56", "--width", "84", "--max_new_tokens", str(NEW_TOKENS)],
    "qwen2_5_vl": ["--max_frames", "4", "--height", "56", "--width", "84", "--max_new_tokens", str(NEW_TOKENS)],
    "qwen3_vl": ["--max_frames", "4", "--height", "64", "--width", "96", "--max_frame_tokens", "6",
                 "--max_new_tokens", str(NEW_TOKENS)],
    "qwen3_5": ["--max_frames", "4", "--height", "64", "--width", "96", "--max_frame_tokens", "6",
                "--max_new_tokens", str(NEW_TOKENS)],
    "blip2": ["--num_frames", "2", "--max_new_tokens", str(NEW_TOKENS), "--min_new_tokens", "2", "--num_beams", "2"],
    "llava": ["--num_frames", "2", "--max_new_tokens", str(NEW_TOKENS)],
    "pllava": ["--num_frames", "3", "--max_new_tokens", str(NEW_TOKENS)],
    "video_llama": ["--num_frames", "3", "--max_new_tokens", str(NEW_TOKENS)],
}


def save_video_llama(root: Path) -> Path:
    from tests.test_video_llama import TorchVideoLlama, build_folder

    return build_folder(TorchVideoLlama(), root)


def save_qwen2_5_vl(root: Path) -> Path:
    """The tiny Qwen2.5-VL of tests/test_qwen2_5_vl.py, saved as its checkpoint fixture saves it."""
    from tests import test_qwen2_5_vl as tiny

    tiny.hf_model().save_pretrained(root)
    tiny.save_tokenizer(root)
    (root / "preprocessor_config.json").write_text(json.dumps(
        {**tiny.PIXELS, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
         "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}))
    (root / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": tiny.EOS, "pad_token_id": tiny.ENDOFTEXT, "bos_token_id": tiny.ENDOFTEXT}))
    return root


def save_qwen3_vl(root: Path) -> Path:
    from tests.test_qwen3_vl import save_checkpoint

    return save_checkpoint(root)


def save_qwen3_5(root: Path) -> Path:
    from tests.test_qwen3_5_vl import save_qwen3_5 as save

    return save(root)


def save_llava(kind: str):
    def save(root: Path) -> Path:
        llava_fixtures.save_checkpoint(root, kind)
        return root
    return save


SAVERS = {"qwen2_vl": save_qwen2vl, "qwen2_5_vl": save_qwen2_5_vl, "qwen3_vl": save_qwen3_vl, "qwen3_5": save_qwen3_5,
          "blip2": lambda root: save_tiny_blip2(root, OPT), "llava": save_llava("llava"),
          "pllava": save_llava("pllava"), "video_llama": save_video_llama}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return write_caption_clips(tmp_path_factory.mktemp("serve_videos")).parent


def data_url(path: Path, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def video_message(url: str, text: str | None = None) -> dict:
    content = [{"type": "video_url", "video_url": {"url": url}}]
    return {"role": "user", "content": content + ([{"type": "text", "text": text}] if text is not None else [])}


class ThreadServer:
    """The real aiohttp application on 127.0.0.1 (a free port) in its own event-loop thread."""

    def __init__(self, engine: Engine, **overrides):
        values = dict(model_name="tiny", max_tokens=32, max_frames=8, max_batch=8, batch_wait_s=0.02,
                      decode_workers=2, media=MediaPolicy(max_bytes=2 ** 20))
        self.engine, self.settings = engine, Settings(**{**values, **overrides})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _start(self) -> str:
        self.runner = web.AppRunner(build_app(self.engine, self.settings, self.settings.media.max_bytes))
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> str:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Checkpoint folders built lazily per family, once per module."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = SAVERS[family](tmp_path_factory.mktemp(family))
        return cache[family]
    return get


@pytest.fixture(scope="module")
def engines(checkpoints):
    """Engines (a loaded captioner each) built lazily per family, once per module."""
    cache: dict[str, Engine] = {}

    def get(family: str) -> Engine:
        if family not in cache:
            cache[family] = Engine.load(str(checkpoints(family)), FAMILY_ARGV[family], device="CPU")
        return cache[family]
    return get


@pytest.fixture(scope="module")
def qwen(engines, videos):
    """A Qwen2-VL server that allows local media under the videos folder, and http(s) media."""
    engine = engines("qwen2_vl")
    # the test's own HTTP server is on loopback, which the media policy refuses unless allowed by name
    media = MediaPolicy(max_bytes=2 ** 20, allowed_local_path=videos.resolve(), allow_remote=True,
                        allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),))
    with ThreadServer(engine, media=media, max_frames=5, batch_wait_s=0.3, max_batch=4) as url:
        yield engine, url


def complete(url: str, body: dict) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_qwen3_vl_server_samples_as_the_runner_does(engines, videos):
    """The server's Qwen3-VL videos get qwen-vl-utils' 4 frames at least and the frames' real times, as the
    runner's; the 1.5 s clip at 2 fps would have 3 frames at 0, 0.5 and 1 s."""
    import numpy as np

    from pipeline.datasets.video import sample_frames

    clip = engines("qwen3_vl").video_frames(videos / "v0.mp4")
    want, times = sample_frames(str(videos / "v0.mp4"), num_frames=4, fps=2, min_frames=4, height=64, width=96,
                                return_times=True)
    assert len(clip.frames) == 4 and np.array_equal(clip.frames, want)
    np.testing.assert_array_equal(clip.times, times)
    assert len(set(np.round(clip.times, 3))) == 4 and clip.times[-1] > 1.0  # spread over the clip


@pytest.mark.parametrize("family", list(FAMILY_ARGV))
def test_completion_equals_in_process_caption(family, engines, videos):
    """A served one-turn chat with the caption prompt answers exactly what the captioner's fixed-prompt
    path (the runner's) captions for the same frames."""
    engine = engines(family)
    video = videos / "v2.mp4"
    captioner = engine.captioner
    clip = engine.video_frames(video)  # the runner's sampling, frame times included for the Qwen families
    timed = {"frame_times": clip.times} if captioner.frame_spec.times else {}
    expected = captioner.generate([captioner.prepare(clip.frames, **timed)])[0]["text"]
    with ThreadServer(engine) as url:
        models = requests.get(f"{url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        response = complete(url, {"model": "tiny", "max_tokens": NEW_TOKENS, "temperature": 0,
                                  "messages": [video_message(data_url(video), engine.question)]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= NEW_TOKENS and usage["prompt_tokens"] > 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_concurrent_clients_share_generate_calls(qwen, videos):
    engine, url = qwen
    clips = [videos / f"v{i}.mp4" for i in range(4)]
    alone = [complete(url, {"max_tokens": NEW_TOKENS, "messages": [video_message(data_url(c))]}).json()
             for c in clips[:2]]
    before = requests.get(f"{url}/health", timeout=10).json()["generate_calls"]
    assert before == engine.generate_calls
    with ThreadPoolExecutor(len(clips)) as pool:
        responses = list(pool.map(lambda c: complete(url, {"max_tokens": NEW_TOKENS,
                                                            "messages": [video_message(data_url(c))]}), clips))
    calls = requests.get(f"{url}/health", timeout=10).json()["generate_calls"] - before
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert 1 <= calls < len(clips), f"{len(clips)} concurrent requests took {calls} generate calls"
    for single, batched in zip(alone, responses):  # batched with others, the same answer as alone
        assert batched.json()["choices"][0]["message"] == single["choices"][0]["message"]


def read_events(response: requests.Response) -> list:
    events = [line[len("data: "):] for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streaming_returns_the_same_text(qwen, videos):
    _, url = qwen
    body = {"max_tokens": NEW_TOKENS, "messages": [video_message(data_url(videos / "v3.mp4"), "describe the video")]}
    whole = complete(url, body).json()
    streamed = complete(url, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200 and streamed.headers["Content-Type"].startswith("text/event-stream")
    chunks = read_events(streamed)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]


def test_streaming_sends_tokens_as_they_are_generated(qwen, videos):
    """Deltas leave while the reply is being generated: they arrive spread over the decoding time, and
    more than one arrives (a reply sent whole after generation would come in one burst)."""
    _, url = qwen
    body = {"max_tokens": 24, "min_tokens": 12, "stream": True, "stream_options": {"include_usage": True},
            "messages": [video_message(data_url(videos / "v3.mp4"), "describe the video")]}
    arrivals, chunks = [], []
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                chunks.append(json.loads(line[len(b"data: "):]))
                arrivals.append(time.perf_counter())
    content = [t for t, c in zip(arrivals, chunks) if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert chunks[-1]["usage"]["completion_tokens"] >= 12, "min_tokens holds the end back"
    assert len(content) >= 3 and content[-1] - content[0] > 0.02, (len(content), content[-1] - content[0])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    whole = complete(url, {**body, "stream": False}).json()["choices"][0]["message"]["content"]
    assert text == whole


def test_text_stream_adds_up_to_the_final_reply():
    """Leading and trailing space and the start of a stop string wait; a stop string ends the stream."""
    from pipeline.serve.streaming import TextStream

    pieces = {1: " Hello", 2: " wor", 3: "ld", 4: " #", 5: "#", 6: "#Human", 7: " more"}
    stream = TextStream(lambda ids: "".join(pieces[i] for i in ids), stop="###")
    deltas = [stream.add(i) for i in pieces]
    assert deltas == ["Hello", " wor", "ld", "", "", "", ""]
    assert "".join(deltas) + stream.finish("Hello world") == "Hello world"
    plain = TextStream(lambda ids: "".join(pieces[i] for i in ids))
    assert [plain.add(i) for i in (1, 2, 3)] == ["Hello", " wor", "ld"] and plain.finish("Hello world!") == "!"


def test_multi_turn_images_local_paths_and_http(qwen, videos):
    """History goes into the prompt; media may come as images (as API captioners send frames), local paths
    or http URLs."""
    _, url = qwen
    video = videos / "v1.mp4"
    first = complete(url, {"messages": [video_message(data_url(video), "what is shown")]}).json()
    answer = first["choices"][0]["message"]["content"]
    second = complete(url, {"messages": [video_message(data_url(video), "what is shown"),
                                         {"role": "assistant", "content": answer},
                                         {"role": "user", "content": "what moves"}]}).json()
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    frames = requests.post(f"{url}/v1/frames", json={"url": data_url(video)}, timeout=60).json()
    assert frames["num_frames"] == 4 and (frames["height"], frames["width"]) == (56, 84)
    images = [{"type": "image_url", "image_url": {"url": f}} for f in frames["frames"]]
    as_images = complete(url, {"messages": [{"role": "user", "content": images + [{"type": "text", "text": "x"}]}]})
    assert as_images.status_code == 200, as_images.text
    local = complete(url, {"messages": [video_message(str(video), "what is shown")]})
    assert local.json()["choices"][0]["message"]["content"] == answer
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(videos))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as files:
        threading.Thread(target=files.serve_forever, daemon=True).start()
        remote = complete(url, {"messages": [video_message(f"http://127.0.0.1:{files.server_port}/v1.mp4",
                                                           "what is shown")]})
        files.shutdown()
    assert remote.json()["choices"][0]["message"]["content"] == answer


# A llava-hf style chat template (images first in a turn, then its text), for the template path.
LLAVA_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                       "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }} {% endif %}{% endfor %}"
                       "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
TURNS = [Turn("user", "what is shown", media=True), Turn("assistant", "a red square"), Turn("user", "what moves")]


@pytest.mark.parametrize("family", ["blip2", "llava", "pllava", "video_llama"])
def test_conversation_prompt_of_each_family(family, engines):
    """Families without a chat template: the video's turn in the captioner's own prompt, later turns after it."""
    captioner = engines(family).captioner
    first = {"blip2": "Question: what is shown Answer:",
             "video_llama": "###Human: <Video><ImageHere></Video> what is shown###Assistant:"}.get(
        family, getattr(captioner, "prompt_template", "").replace("{question}", "what is shown"))
    rest = {"blip2": " a red square Question: what moves Answer:",
            "video_llama": " a red square###Human: what moves###Assistant:"}.get(
        family, " a red square</s>USER: what moves ASSISTANT:")
    assert captioner.chat_prompt(TURNS) == first + rest
    assert captioner.chat_prompt(TURNS[:1]) == ("what is shown" if family == "blip2" else first)  # as captioning


def test_llava_conversation_through_its_chat_template_and_over_http(engines, videos):
    engine = engines("llava")
    tokenizer = engine.captioner.tokenizer
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    try:
        assert engine.captioner.chat_prompt(TURNS) == \
            "USER: <image>\nwhat is shown ASSISTANT: a red square USER: what moves ASSISTANT:"
        with ThreadServer(engine) as url:
            response = complete(url, {"messages": [video_message(data_url(videos / "v0.mp4"), "what is shown"),
                                                   {"role": "assistant", "content": "a red square"},
                                                   {"role": "user", "content": [{"type": "text",
                                                                                 "text": "what moves"}]}]})
    finally:
        tokenizer.chat_template = None
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] > 2 * engine.captioner.model.image_token_count()  # 2 frames


def test_bad_requests_get_4xx_and_the_server_keeps_serving(qwen, videos, tmp_path):
    _, url = qwen
    good = data_url(videos / "v0.mp4")
    outside = tmp_path / "elsewhere.mp4"
    shutil.copy(videos / "v0.mp4", outside)
    frame = requests.post(f"{url}/v1/frames", json={"url": good}, timeout=60).json()["frames"][0]
    cases = {
        "invalid_json": (400, dict(data=b"{not json")),
        "invalid_messages": (400, dict(json={"model": "tiny"})),
        "invalid_base64": (400, dict(json={"messages": [video_message("data:video/mp4;base64,@@not-base64@@")]})),
        "unreadable_media": (400, dict(json={"messages": [video_message(data_url(videos / "broken.mp4"))]})),
        "model_not_found": (404, dict(json={"model": "gpt-4o", "messages": [video_message(good)]})),
        "too_many_frames": (400, dict(json={"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": frame}}] * 6}]})),
        "missing_media": (400, dict(json={"messages": [{"role": "user", "content": "hello"}]})),
        "local_media_not_allowed": (403, dict(json={"messages": [video_message(str(outside))]})),
        "invalid_parameter": (400, dict(json={"temperature": "hot", "messages": [video_message(good)]})),
        "request_too_large": (413, dict(data=b"x" * (2 ** 20 + 10))),
        "invalid_prompt": (400, dict(json={"messages": [video_message(good, "a <|video_pad|> too many")]})),
    }
    for code, (status, kwargs) in cases.items():
        response = requests.post(f"{url}/v1/chat/completions", timeout=60, **kwargs)
        assert response.status_code == status, (code, response.text)
        error = response.json()["error"]
        assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"], error
    missing = requests.get(f"{url}/v1/nothing", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    assert complete(url, {"messages": [video_message(good)]}).status_code == 200


def test_a_hanging_video_gets_a_400_and_the_server_keeps_serving(engines, videos, tmp_path):
    """Videos decode in processes: one that would hang (an AVI with 64 GiB of sparse zeros) is stopped after
    --decode_timeout and its request refused, while the next request is served."""
    from tests.test_decode_pool import write_hanging_avi

    hanging = write_hanging_avi(tmp_path / "hang.avi")
    shutil.copyfile(videos / "v3.mp4", tmp_path / "v3.mp4")
    media = MediaPolicy(max_bytes=2 ** 20, allowed_local_path=tmp_path.resolve())
    with ThreadServer(engines("qwen2_vl"), media=media, decode_timeout=2) as url:
        started = time.monotonic()
        refused = complete(url, {"max_tokens": 2, "messages": [video_message(str(hanging))]})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "unreadable_media"
        assert "decoding took longer than 2 s" in refused.json()["error"]["message"]
        assert time.monotonic() - started < 60
        served = complete(url, {"max_tokens": 2, "min_tokens": 1,
                                "messages": [video_message(str(tmp_path / "v3.mp4"))]})
        assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] >= 1


def test_chat_cli_two_turns_carry_the_history(checkpoints, videos):
    script = "what is shown\nwhat moves\n/reset\nwhat is shown\n"  # then end of input
    run = subprocess.run([sys.executable, "-m", "pipeline.chat", str(videos / "v2.mp4"),
                          "--pretrained_model_name_or_path", str(checkpoints("qwen2_vl")), "--device", "CPU",
                          "--show_prompt", *FAMILY_ARGV["qwen2_vl"]],
                         input=script, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    prompts = [line.split("[prompt] ", 1)[1] for line in lines if "[prompt] " in line]
    answers = [line.split("model> ", 1)[1] for line in lines if "model> " in line]
    assert len(prompts) == 3 and len(answers) == 3, run.stdout
    assert all(answers), answers
    second = prompts[1]
    assert second.count("<|video_pad|>") == 1
    order = [second.index("what is shown"), second.index(answers[0]), second.index("what moves")]
    assert order == sorted(order), second  # the first question, its answer, then the new question
    assert prompts[2] == prompts[0] and answers[2] == answers[0]  # /reset: a fresh conversation


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str:
    """Debian's chromium, installed with apt when missing and possible; else the test is skipped."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, timeout=300, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=False, capture_output=True,
                       timeout=900, env=env)
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed and could not be installed with apt (apt-get install chromium)")
    return found


@pytest.fixture
def served(checkpoints, tmp_path):
    """``python -m pipeline.serve`` itself, on a free port of 127.0.0.1."""
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.serve", "--pretrained_model_name_or_path",
                                    str(checkpoints("qwen2_vl")), "--host", "127.0.0.1", "--port", str(port),
                                    "--device", "CPU", "--max_tokens", str(NEW_TOKENS), *FAMILY_ARGV["qwen2_vl"]],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def test_web_page_frames_caption_and_chat_in_chromium(served, videos, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-test.txt")
    executable = chromium()
    with sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.goto(served + "/")
            page.wait_for_function("document.getElementById('caption-prompt').value.length > 0")
            page.set_input_files("#video-file", str(videos / "v2.mp4"))
            page.wait_for_function("document.querySelectorAll('#frames img').length === 4", timeout=60000)
            page.click("#caption-btn")
            page.wait_for_function("document.getElementById('caption').textContent.trim().length > 0",
                                   timeout=120000)
            caption = page.text_content("#caption")
            page.fill("#chat-input", "what moves")
            page.click("#send-btn")
            page.wait_for_function("(() => { const m = document.querySelectorAll('.msg.assistant');"
                                   " return m.length === 1 && m[0].textContent !== '\u2026'; })()", timeout=120000)
            reply = page.text_content(".msg.assistant")
            assert page.text_content("#status") == ""
            shot = tmp_path / "serve_page.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert caption.strip() and reply.strip()
    assert shot.stat().st_size > 10_000  # benchmarks/results/serve_page.png is one of these


def test_caption_api_against_the_server_resumes_after_a_kill(served, videos, tmp_path):
    """caption_api.py sends each row's frames to this server; SIGKILLed mid-run, the re-run finishes with
    every row exactly once and redoes only what was not written."""
    table = pd.read_csv(videos / "meta.csv")
    rows = pd.concat([table.assign(path=[str(videos / p) for p in table["path"]], copy=i) for i in range(3)])
    rows["start"] = [f"{0.1 * i:.1f}" for i in range(len(rows))]  # distinct segments: distinct rows
    csv_path = tmp_path / "meta.csv"
    rows.to_csv(csv_path, index=False)
    out, part = tmp_path / "captions.csv", tmp_path / "captions.csv.part0.csv"
    cmd = [sys.executable, "-m", "pipeline.captioning.caption_api", str(csv_path), "--base_url", f"{served}/v1",
           "--bs", "1", "--num_frames", "2", "--max_new_tokens", str(NEW_TOKENS), "--device", "CPU",
           "--output", str(out), "--no-cleanup"]
    kill_when_written(cmd, ROOT, dict(os.environ), part, 4)  # the header and 3 rows
    written = len(pd.read_csv(part))
    assert 3 <= written < len(rows) and not out.exists(), "the kill lands mid-run"
    calls = requests.get(f"{served}/health", timeout=10).json()["generate_calls"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert sorted(zip(result["path"], result["start"])) == sorted(zip(rows["path"], rows["start"]))
    good = result[~result["path"].str.endswith("broken.mp4")]
    assert (good["status"] == "ok").all() and (good["text"] != "").all()
    assert (good["completion_tokens"].astype(int) > 0).all() and (good["prompt_tokens"].astype(int) > 0).all()
    assert (result[result["path"].str.endswith("broken.mp4")]["status"] == "error").all()
    redone = requests.get(f"{served}/health", timeout=10).json()["generate_calls"] - calls
    assert redone <= len(good) - (written - 1), "rows already written are not sent again"
