"""The server under failures and departures: one failing request fails only itself, and work for clients
that have gone is dropped (issue 28, items 5 and 6).

The bundled demo model (examples/demo_model, a small BLIP-2 OPT with 64 positions and 32 query tokens)
answers greedily. Its language model alone, given 8 stand-in query tokens: a prompt of 30 tokens (22 words)
asked for 40 new tokens runs past the model's positions in its one-token steps, whose compiled graph then
raises; a 12-token prompt with the same 40 tokens uses the very same graphs (the same prompt bucket and
cache length) and fits. Through the engine (the 32 queries in front), 20 new tokens fit after the short
prompt (36 tokens) and not after the long one (54).
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
import pytest
import requests

from models.generation import generate
from pipeline.captioning.chat import Turn
from pipeline.serve.app import BATCHER
from pipeline.serve.batching import Batcher
from pipeline.serve.engine import Clip, Engine
from pipeline.serve.media import MediaPolicy
from tests.test_serve import ThreadServer

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo_model"
NEW_TOKENS, ANSWER_TOKENS = 40, 20  # for the language model alone, and through the engine
GOOD, TOO_LONG = "a video of", "a video of " * 7


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(str(DEMO), ["--num_frames", "2", "--num_beams", "1", "--max_new_tokens", "4",
                                    "--min_new_tokens", "1"], device="CPU")


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)


def image_url(seed: int = 0) -> str:
    image = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    return "data:image/jpeg;base64," + base64.b64encode(cv2.imencode(".jpg", image)[1].tobytes()).decode()


def chat(text: str, seed: int = 0, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_url(seed)}}, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], **extra}


def server(engine: Engine, **overrides) -> ThreadServer:
    values = dict(max_tokens=ANSWER_TOKENS, batch_wait_s=0.05, decode_timeout=0, media=MediaPolicy(max_bytes=2 ** 20))
    return ThreadServer(engine, **{**values, **overrides})


def send(url: str, body: dict) -> socket.socket:
    """A raw connection that has sent ``body`` to the chat endpoint (the caller closes it: a client leaving)."""
    parts = urlsplit(url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def wait_for(condition, seconds: float = 60) -> bool:
    """Whether ``condition()`` came true within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_failed_compiled_step_leaves_its_graph_usable(engine):
    """MindSpore keeps a compiled graph whose run raised unusable ("Invalid output number for flatten stub
    output nodes"): the next generation that needs the same graph must still work and give the same ids."""
    lm, tokenizer = engine.captioner.model.language_model, engine.captioner.tokenizer
    ids = {text: np.array([[5] * 8 + tokenizer(text)["input_ids"]]) for text in (GOOD, TOO_LONG)}
    assert [i.shape[1] for i in ids.values()] == [12, 30]
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=1)
    expected = generate(lm, input_ids=ids[GOOD], **options).sequences
    with pytest.raises(RuntimeError, match="input_indices"):
        generate(lm, input_ids=ids[TOO_LONG], **options)  # positions 64 and on do not exist
    np.testing.assert_array_equal(generate(lm, input_ids=ids[GOOD], **options).sequences, expected)


def test_one_failing_request_in_a_batch_fails_only_itself(engine, frames):
    """Without any check ahead of the model, a batch holding a request that fails is retried without
    sharing the failure: the others get the answers they get alone, the failing one its error."""
    options = engine.options(ANSWER_TOKENS, min_tokens=ANSWER_TOKENS)
    good, bad = (engine.prepare(Clip(frames), [Turn("user", text, media=True)]) for text in (GOOD, TOO_LONG))
    alone = engine.generate([good], options)[0]
    calls = engine.generate_calls

    async def run() -> list:
        batcher = Batcher(engine.generate, max_batch=8, wait_s=0.2)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(p, options, "key") for p in (good, bad, good)),
                                        return_exceptions=True)
        finally:
            await batcher.stop()

    first, failed, last = asyncio.run(run())
    assert engine.generate_calls - calls == 4, "one batch of three, then each request alone"
    assert first == alone and last == alone, (first, last)
    assert isinstance(failed, RuntimeError) and "input_indices" in str(failed), failed


def test_forty_concurrent_requests_with_five_too_long(engine):
    """The 35 good requests of 40 sent at once are answered; the 5 whose prompt the model cannot take get
    a 4xx."""
    bodies = [chat(TOO_LONG * 4 if i % 8 == 3 else GOOD, seed=i, max_tokens=4) for i in range(40)]
    with server(engine) as url, ThreadPoolExecutor(40) as pool:
        responses = list(pool.map(lambda b: requests.post(f"{url}/v1/chat/completions", json=b, timeout=300),
                                  bodies))
        assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    statuses = [r.status_code for r in responses]
    bad = [s for i, s in enumerate(statuses) if i % 8 == 3]
    assert len(bad) == 5 and all(400 <= s < 500 for s in bad), [(s, r.text) for s, r in zip(statuses, responses)]
    good = [r for i, r in enumerate(responses) if i % 8 != 3]
    assert all(r.status_code == 200 and r.json()["choices"][0]["message"]["content"] for r in good), \
        [r.text for r in good if r.status_code != 200]


def test_requests_whose_clients_left_are_not_generated(engine, monkeypatch, caplog):
    """Requests queued behind a busy model whose clients then disconnect are dropped when their batch is
    formed: the next live request is generated alone, and the drop is logged in one line."""
    gate, sizes = threading.Event(), []
    real = engine.generate

    def gated(batch, options):
        sizes.append(len(batch))
        if len(sizes) == 1:
            gate.wait(60)
        return real(batch, options)

    monkeypatch.setattr(engine, "generate", gated)
    caplog.set_level(logging.INFO)
    running = server(engine)
    with running as url, ThreadPoolExecutor(2) as pool:
        batcher = running.runner.app[BATCHER]
        first = pool.submit(requests.post, f"{url}/v1/chat/completions", json=chat(GOOD, max_tokens=2), timeout=120)
        assert wait_for(lambda: sizes == [1])
        gone = [send(url, chat(GOOD, seed=i, max_tokens=2)) for i in range(6)]
        assert wait_for(lambda: batcher.queue.qsize() == 6)
        for sock in gone:
            sock.close()
        time.sleep(0.2)  # the server reads the closed connections
        live = pool.submit(requests.post, f"{url}/v1/chat/completions", json=chat(GOOD, 9, max_tokens=2), timeout=120)
        assert wait_for(lambda: batcher.queue.qsize() == 7)
        gate.set()
        assert first.result().status_code == 200 and live.result().status_code == 200, live.result().text
    assert sizes == [1, 1], f"batches of {sizes}: requests of clients that had left were generated"
    assert any("6" in r.getMessage() and "left" in r.getMessage() for r in caplog.records), caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_streamed_reply_stops_when_its_client_leaves(engine, monkeypatch, caplog):
    """A streaming client that leaves after the first text stops the generation (no more steps than a
    few) and the server logs one line, no traceback."""
    captioner = engine.captioner
    real, steps, outcome = captioner.generate, [], []

    def slow(batch, prompts=None, options=None):
        streamer = options["streamer"]

        def counted(tokens: np.ndarray) -> None:
            steps.append(tokens)
            time.sleep(0.02)  # a model slow enough that a reply takes a while
            streamer(tokens)
        try:
            outcome.append(real(batch, prompts=prompts, options={**options, "streamer": counted}))
        except Exception as exc:
            outcome.append(exc)
            raise
        return outcome[-1]

    monkeypatch.setattr(captioner, "generate", slow)
    caplog.set_level(logging.INFO)
    with server(engine) as url:
        sock = send(url, chat(GOOD, max_tokens=ANSWER_TOKENS, min_tokens=ANSWER_TOKENS, stream=True))
        received = b""
        while b'"content": "' not in received.replace(b'"content": ""', b""):
            received += sock.recv(65536)
        sock.close()
        assert wait_for(lambda: outcome)
        logged = wait_for(lambda: departures(caplog) == 1, 10)
        assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    assert len(steps) < ANSWER_TOKENS // 2, f"{len(steps)} of {ANSWER_TOKENS} steps ran after the client left"
    assert isinstance(outcome[0], ConnectionError), outcome[0]
    assert logged and not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    assert departures(caplog) == 1, caplog.text  # one line


def departures(caplog) -> int:
    """The server's log lines about a client that left."""
    return sum("left" in r.getMessage() for r in caplog.records if r.name.startswith("pipeline"))

