"""Every captioner family runs in the runtime environment: requirements.txt alone, without the test extras.

The suite runs where torch is installed, and torch brings packages the runtime needs too. jinja2 once came only
that way: the suite passed while, in a real install, caption_qwen2vl.py failed on every row with "apply_chat_template
requires jinja2". So here each entry script (and the server) runs under the python of a separate venv built from
requirements.txt alone (rebuilt when requirements.txt changes), on tiny checkpoints this process writes with
torch and transformers. The checkpoints of Qwen2-VL, Qwen2.5-VL, the enhancer and the served LLaVA carry chat
templates, so the jinja2 path runs.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests import llava_fixtures
from tests.test_enhance import save_chat_model
from tests.test_qwen2vl import save_checkpoint as save_qwen2vl
from tests.structured_fixtures import TEST_SCHEMA, save_qwen2vl_bpe
from tests.test_serve import data_url, free_port, save_qwen2_5_vl, save_qwen3_5, save_video_llama, video_message
from tests.tiny_models import OPT, save_tiny_blip2
from tests.video_factory import write_caption_clips

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements.txt"
BUILD_TIMEOUT = 20 * 60
RUN_TIMEOUT = 300
# A start is meant to be quiet: no expected-noise notices (environment.quiet_start hides them), no crash.
NOISE = ("PyTorch was not found", "Ascend is not available", "Traceback")
# No --device: each run asks MindSpore whether Ascend is there, so NOISE checks that the probe is quiet.
COMMON = ["--max_new_tokens", "4", "--bs", "2"]
# llava-hf's LLaVA-1.5 format: the server builds a LLaVA checkpoint's prompts with its chat template.
LLAVA_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'].upper() }}: "
                       "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
                       "{% else %}{{ part['text'] }} {% endif %}{% endfor %}{% endfor %}"
                       "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def save_llava(kind: str):
    def save(folder: Path) -> Path:
        llava_fixtures.save_checkpoint(folder, kind)
        if kind == "llava":
            tokenizer = AutoTokenizer.from_pretrained(folder)
            tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
            tokenizer.save_pretrained(folder)
        return folder
    return save


def save_qwen3_vl_moe(folder: Path) -> Path:
    from tests.test_qwen3_vl import save_checkpoint
    from tests.test_qwen3_vl_moe import hf_moe

    return save_checkpoint(folder, model=hf_moe())


# family -> (entry script under pipeline.captioning, checkpoint writer, the family's flags)
CAPTIONERS = {
    "blip2": ("caption_blip2", lambda folder: save_tiny_blip2(folder, OPT),
              ["--num_frames", "2", "--num_beams", "1", "--min_new_tokens", "1"]),
    "qwen2_vl": ("caption_qwen2vl", save_qwen2vl, ["--num_frames", "4", "--height", "56", "--width", "84"]),
    "qwen2_5_vl": ("caption_qwen2vl", save_qwen2_5_vl, ["--max_frames", "4", "--height", "56", "--width", "84"]),
    "llava": ("caption_llava", save_llava("llava"), ["--num_frames", "2"]),
    "llava_next": ("caption_llava", save_llava("next"), ["--num_frames", "1"]),
    "pllava": ("caption_pllava", save_llava("pllava"), ["--num_frames", "3"]),
    "video_llama": ("caption_videollama", save_video_llama, ["--num_frames", "3"]),
    "qwen3_vl_moe": ("caption_qwen2vl", save_qwen3_vl_moe, ["--max_frames", "4", "--height", "64", "--width", "96",
                                                             "--max_frame_tokens", "6"]),
    "qwen3_5": ("caption_qwen2vl", save_qwen3_5, ["--max_frames", "4", "--height", "64", "--width", "96",
                                                  "--max_frame_tokens", "6"]),
}


@pytest.fixture(scope="module")
def runtime_python() -> str:
    """The runtime venv's python; the venv is (re)built when missing or older than requirements.txt."""
    venv = Path(os.environ.get("MSCAPTION_RUNTIME_VENV", ROOT / ".venv-runtime"))
    python, stamp = venv / "bin" / "python", venv / "requirements.sha256"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if not (python.is_file() and stamp.is_file() and stamp.read_text().strip() == digest):
        base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
        clear = ["--clear"] if stamp.is_file() else []  # empty only a venv built here, never a foreign one
        for cmd in ([str(base) if base.is_file() else "python3", "-m", "venv", *clear, str(venv)],
                    [str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS), "-e", str(ROOT)]):
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
            if result.returncode != 0:
                pytest.fail(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}", pytrace=False)
        stamp.write_text(digest + "\n")
    return str(python)


def runtime_env() -> dict[str, str]:
    """This environment without what would change the runtime's: a PYTHONPATH (it could reach the test
    venv's packages) and MSCAPTION_VERBOSE (it lets the expected notices through)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MSCAPTION_VERBOSE")}


def assert_quiet(log: str) -> None:
    assert not [n for n in NOISE if n in log], log[-3000:]


def run_module(python: str, module: str, *args: str) -> None:
    result = subprocess.run([python, "-m", module, *args], cwd=ROOT, env=runtime_env(), capture_output=True,
                            text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_quiet(result.stderr)


def statuses(table: Path) -> dict[str, str]:
    with open(table, newline="") as f:
        return {row["path"]: row["status"] for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Checkpoint folders written once per family, on first use."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = CAPTIONERS[family][1](tmp_path_factory.mktemp(family))
        return cache[family]
    return get


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """meta.csv: two 1 s clips (v0.mp4, v1.mp4) and a corrupt broken.mp4."""
    return write_caption_clips(tmp_path_factory.mktemp("videos"),
                               (("testsrc=decimals=0", 1.0), ("color=c=red", 1.0)))


def test_runtime_venv_has_no_test_extras(runtime_python):
    for module in ("torch", "pytest"):
        result = subprocess.run([runtime_python, "-c", f"import {module}"], cwd=ROOT, env=runtime_env(),
                                capture_output=True, text=True, timeout=60)
        assert f"No module named '{module}'" in result.stderr, f"{module} is importable in the runtime venv"


@pytest.mark.parametrize("family", list(CAPTIONERS))
def test_captioner_runs(family, runtime_python, checkpoint, videos, tmp_path):
    script, _, flags = CAPTIONERS[family]
    out = tmp_path / "captions.csv"
    run_module(runtime_python, f"pipeline.captioning.{script}", str(videos), "--pretrained_model_name_or_path",
               str(checkpoint(family)), "--output", str(out), *COMMON, *flags)
    assert statuses(out) == {"v0.mp4": "ok", "v1.mp4": "ok", "broken.mp4": "error"}
    with open(out, newline="") as f:
        ok = [row for row in csv.DictReader(f) if row["status"] == "ok"]
    assert all(row["repetition"] in ("true", "false") and row["retried"] in ("true", "false") for row in ok), \
        "loop-proof decoding is on by default in every captioner"


def test_structured_captions_run(runtime_python, videos, tmp_path):
    """--schema: the grammar engine and jsonschema come with requirements.txt and need no torch."""
    schema = tmp_path / "scene.json"
    schema.write_text(json.dumps(TEST_SCHEMA))
    out = tmp_path / "captions.csv"
    run_module(runtime_python, "pipeline.captioning.caption_qwen2vl", str(videos), "--pretrained_model_name_or_path",
               str(save_qwen2vl_bpe(tmp_path / "model")), "--output", str(out), "--schema", str(schema),
               "--max_new_tokens", "96", "--bs", "2", *CAPTIONERS["qwen2_vl"][2])
    assert statuses(out) == {"v0.mp4": "ok", "v1.mp4": "ok", "broken.mp4": "error"}


def test_enhance_captions_runs(runtime_python, tmp_path):
    save_chat_model(tmp_path / "model")  # a tiny Qwen2 with a chat template
    table = tmp_path / "captions.csv"
    table.write_text("path,text\nv0.mp4,a red square moves left\nv1.mp4,a blue circle grows\n")
    out = tmp_path / "enhanced.csv"
    run_module(runtime_python, "pipeline.captioning.enhance_captions", str(table), "--pretrained_model_name_or_path",
               str(tmp_path / "model"), "--template", "concise", "--output", str(out), *COMMON)
    assert statuses(out) == {"v0.mp4": "ok", "v1.mp4": "ok"}


def wait_for_health(server: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 180
    while True:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)


def test_server_answers_a_chat_completion(runtime_python, checkpoint, videos, tmp_path):
    """The LLaVA server: its prompts go through the checkpoint's chat template."""
    port, log = free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        server = subprocess.Popen([runtime_python, "-m", "pipeline.serve", "--pretrained_model_name_or_path",
                                   str(checkpoint("llava")), "--host", "127.0.0.1", "--port", str(port),
                                   "--num_frames", "2", "--max_new_tokens", "4"],
                                  cwd=ROOT, env=runtime_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_health(server, url, log)
        body = {"max_tokens": 4, "min_tokens": 1, "temperature": 0,
                "messages": [video_message(data_url(videos.parent / "v0.mp4"), "describe the video")]}
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, reply = response.status, json.load(response)
        except urllib.error.HTTPError as error:
            status, reply = error.code, error.read().decode()
    finally:
        server.terminate()
        server.wait(30)
    assert status == 200 and reply["choices"][0]["message"]["content"].strip(), reply
    assert_quiet(log.read_text())


def test_review_page_serves_a_table(runtime_python, videos, tmp_path):
    """The review page's server and a preview strip, with the runtime's packages only."""
    table = tmp_path / "captions.csv"
    table.write_text(f"path,text,status\n{videos.parent / 'v0.mp4'},a test pattern,ok\n")
    port, log = free_port(), tmp_path / "review.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        server = subprocess.Popen([runtime_python, "-m", "pipeline.review", str(table), "--port", str(port),
                                   "--video_root", str(videos.parent)],
                                  cwd=ROOT, env=runtime_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/api/rows", timeout=2) as response:
                    rows = json.load(response)
                break
            except OSError:
                assert time.monotonic() < deadline, "the review page did not come up"
                time.sleep(0.5)
        with urllib.request.urlopen(f"{url}/api/preview/0", timeout=60) as response:
            preview = response.read()
    finally:
        server.terminate()
        server.wait(30)
    assert "a test pattern" in json.dumps(rows)
    assert preview[:3] == b"\xff\xd8\xff", "a JPEG strip"
    assert_quiet(log.read_text())
