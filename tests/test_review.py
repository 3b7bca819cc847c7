"""The review page (python -m pipeline.review): filters, paging, verdicts, previews, path safety, speed, the page.

Servers run on 127.0.0.1: in a thread of this process (the app that ``main`` builds, so tests can time it and
point it at tables they make), and once as ``python -m pipeline.review`` itself for the headless-Chromium test,
whose screenshot is benchmarks/results/review_page.png. Videos are made with ffmpeg.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import pandas as pd
import pytest
import requests
from aiohttp import web

from pipeline.review.__main__ import build_parser, load
from pipeline.review.app import build_app
from tests.test_serve import chromium, free_port
from tests.video_factory import read_index, write_caption_clips, write_index_video

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "benchmarks" / "results" / "review_page.png"
STRUCTURED = json.dumps({"subject": "a red square", "action": "slides to the left", "camera": "static"})


@contextlib.contextmanager
def running(table: Path, *argv: str) -> Iterator[str]:
    """The review server for ``table`` (with the command line's flags) in a thread; yields its URL."""
    args = build_parser().parse_args([str(table), *argv])
    app = build_app(load(args), threads=2)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def rows(url: str, **params: str) -> dict:
    answer = requests.get(f"{url}/api/rows", params=params, timeout=30)
    assert answer.ok, answer.text
    return answer.json()


def mark(url: str, row: int, review: str) -> requests.Response:
    return requests.post(f"{url}/api/review", json={"row": row, "review": review}, timeout=30)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    """A captioning output beside its videos: good clips, a segment, a broken file and paths that escape."""
    folder = tmp_path_factory.mktemp("review")
    write_caption_clips(folder)
    write_index_video(folder / "index.mp4", 40)  # 10 fps: frame i shows i as a barcode
    outside = tmp_path_factory.mktemp("outside")
    write_index_video(outside / "secret.mp4", 10)
    (folder / "link.mp4").symlink_to(outside / "secret.mp4")
    base = {"status": "ok", "error": "", "repetition": "false", "truncated": "false", "caption_objects": "",
            "start": "", "end": "", "num_frames_used": "8"}
    table = [
        {"path": "v0.mp4", "text": STRUCTURED, "caption_objects": '["square", "background"]'},
        {"path": "index.mp4", "start": "1.0", "end": "3.0", "repetition": "true",
         "text": "A barcode of black and white bars flickers. A barcode of black and white bars flickers."},
        {"path": "v1.mp4", "truncated": "true", "text": "A test pattern of coloured bars fills the frame while a"},
        {"path": "broken.mp4", "status": "error", "text": "", "num_frames_used": "",
         "error": "VideoReadError: cannot read video broken.mp4"},
        {"path": "../../etc/passwd", "text": "the password file"},
        {"path": str(outside / "secret.mp4"), "text": "an absolute path outside"},
        {"path": "link.mp4", "text": "a symlink that leads outside"},
    ]
    out = folder / "captions.csv"
    pd.DataFrame([{**base, **row} for row in table]).to_csv(out, index=False)
    return out


@pytest.fixture
def listing(tmp_path) -> Path:
    """A 60-row Parquet output whose videos do not exist (the filters do not need them)."""
    n = 60
    table = pd.DataFrame({
        "path": [f"clips/v{i}.mp4" for i in range(n)],
        "text": [("A dog runs on a beach" if i % 3 == 0 else "A cat sleeps indoors") + f" ({i})" for i in range(n)],
        "status": ["error" if i % 10 == 9 else "ok" for i in range(n)],
        "error": ["" if i % 10 != 9 else "VideoReadError: broken" for i in range(n)],
        "repetition": ["true" if i % 4 == 0 else "false" for i in range(n)],
        "truncated": ["true" if i % 5 == 0 else "false" for i in range(n)],
        "model": ["qwen" if i < 30 else "llava" for i in range(n)],
    })
    path = tmp_path / "captions.parquet"
    table.to_parquet(path, index=False)
    return path


def test_filters_and_paging_on_the_server(listing):
    with running(listing) as url:
        info = requests.get(f"{url}/api/info", timeout=30).json()
        assert info["rows"] == 60 and info["statuses"] == {"ok": 54, "error": 6}
        assert info["flags"] == {"repetition": 15, "truncated": 12} and info["has_path"]
        first = rows(url, limit="25")
        assert first["matched"] == 60 and [r["row"] for r in first["rows"]] == list(range(25))
        last = rows(url, limit="25", offset="50")
        assert [r["row"] for r in last["rows"]] == list(range(50, 60))
        assert rows(url, offset="60")["rows"] == []
        assert [r["row"] for r in rows(url, status="error")["rows"]] == [9, 19, 29, 39, 49, 59]
        assert [r["row"] for r in rows(url, repetition="1", truncated="1")["rows"]] == [0, 20, 40]
        assert rows(url, repetition="0")["matched"] == 45
        dogs = rows(url, q="DOG RUNS", limit="200")
        assert dogs["matched"] == 20 and all("dog" in r["cells"]["text"] for r in dogs["rows"])
        assert [r["row"] for r in rows(url, q="(1", status="ok")["rows"]] == [1, 10, 11, 12, 13, 14, 15, 16, 17, 18]
        assert rows(url, column="model", value="llava", status="error")["matched"] == 3
        assert rows(url, column="model", value="lla")["matched"] == 0  # a column's value matches exactly
        row = rows(url, q="(7)")["rows"][0]
        assert row["cells"]["path"] == "clips/v7.mp4" and row["cells"]["model"] == "qwen" and row["review"] == ""
        for bad in ({"column": "nope", "value": "x"}, {"limit": "0"}, {"offset": "-1"}, {"repetition": "yes"},
                    {"review": "great"}, {"limit": "many"}):
            answer = requests.get(f"{url}/api/rows", params=bad, timeout=30)
            assert answer.status_code == 400 and answer.json()["error"], bad


def test_verdicts_go_to_a_sidecar_and_come_back(listing):
    before = listing.read_bytes()
    sidecar = listing.with_name("captions.parquet.review.csv")
    with running(listing) as url:
        assert mark(url, 3, "good").ok and mark(url, 4, "bad").ok and mark(url, 5, "good").ok
        answer = mark(url, 5, "")  # cleared
        assert answer.ok and answer.json()["reviews"] == {"good": 1, "bad": 1}
        assert [r["row"] for r in rows(url, review="good")["rows"]] == [3]
        assert rows(url, review="none")["matched"] == 58
        assert mark(url, 60, "good").status_code == 400 and mark(url, 1, "great").status_code == 400
        plain = requests.post(f"{url}/api/review", data=json.dumps({"row": 1, "review": "good"}),
                              headers={"Content-Type": "text/plain"}, timeout=30)
        assert plain.status_code == 415  # what another site's form could send
    saved = pd.read_csv(sidecar, dtype=str, keep_default_na=False)
    assert list(saved.columns) == ["path", "review", "reviewed_at"]
    assert saved[["path", "review"]].values.tolist() == [["clips/v3.mp4", "good"], ["clips/v4.mp4", "bad"]]
    assert all(saved["reviewed_at"].str.endswith("+00:00"))
    assert listing.read_bytes() == before, "the output table is never written"
    assert not list(listing.parent.glob(".*.tmp"))
    with running(listing) as url:  # a restart shows the verdicts
        page = rows(url, limit="6")["rows"]
        assert [r["review"] for r in page] == ["", "", "", "good", "bad", ""]
        assert requests.get(f"{url}/api/info", timeout=30).json()["reviews"] == {"good": 1, "bad": 1}


def test_requests_from_other_sites_are_refused(listing):
    with running(listing) as url:
        port = url.rsplit(":", 1)[1]
        assert requests.get(f"{url}/api/info", headers={"Host": f"localhost:{port}"}, timeout=30).ok
        for headers in ({"Host": f"rebound.example:{port}"}, {"Host": "127.0.0.1:1"}, {"Host": ""}):
            assert requests.get(f"{url}/api/rows", headers=headers, timeout=30).status_code == 400, headers
        for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
            answer = requests.post(f"{url}/api/review", json={"row": 0, "review": "bad"}, headers=headers, timeout=30)
            assert answer.status_code == 403, headers
        assert not listing.with_name("captions.parquet.review.csv").exists()
        assert requests.get(url, headers={"Sec-Fetch-Site": "cross-site"}, timeout=30).ok  # a link to the page


def strip_indices(jpeg: bytes, frames: int) -> list[int]:
    image = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    width = (image.shape[1] - 2 * (frames - 1)) // frames
    return [read_index(image[:, i * (width + 2):i * (width + 2) + width]) for i in range(frames)]


def test_previews_segments_cache_broken_videos_and_escaping_paths(captioned):
    cache = captioned.with_name(".captions.csv.review_cache")
    with running(captioned) as url:
        whole = requests.get(f"{url}/api/preview/0", timeout=120)
        assert whole.ok and whole.headers["Content-Type"] == "image/jpeg" and whole.content[:2] == b"\xff\xd8"
        segment = requests.get(f"{url}/api/preview/1", timeout=120)
        assert segment.ok
        indices = strip_indices(segment.content, 4)
        assert indices == sorted(indices) and all(10 <= i < 30 for i in indices), indices  # 1.0 s to 3.0 s
        assert len(list(cache.glob("*.jpg"))) == 2
        broken = requests.get(f"{url}/api/preview/3", timeout=120)
        assert broken.status_code == 422 and "broken.mp4" in broken.json()["error"]
        for row in (4, 5, 6):  # ../../etc/passwd, an absolute path outside, a symlink out
            refused = requests.get(f"{url}/api/preview/{row}", timeout=30)
            assert refused.status_code == 422 and refused.json()["error"].startswith("refused"), row
        assert requests.get(f"{url}/api/preview/99", timeout=30).status_code == 404
        again = requests.get(f"{url}/api/preview/1", timeout=30)
        assert again.content == segment.content  # served after the broken one: the server is fine
    for jpeg in cache.glob("*.jpg"):
        jpeg.write_bytes(b"cached")  # a restarted server answers from the cache folder
    with running(captioned) as url:
        assert requests.get(f"{url}/api/preview/0", timeout=30).content == b"cached"
    os.utime(captioned.with_name("v0.mp4"))  # a changed video gets a new strip
    with running(captioned, "--preview_timeout", "0.001") as url:
        late = requests.get(f"{url}/api/preview/0", timeout=120)
        assert late.status_code == 422 and "--preview_timeout" in late.json()["error"]
    shutil.rmtree(cache)  # the page test makes its own strips


def test_video_root_is_where_relative_paths_live(captioned, tmp_path):
    table = tmp_path / "captions.jsonl"
    videos = captioned.parent
    lines = [{"path": "v2.mp4", "text": "under --video_root"}, {"path": str(tmp_path / "v2.mp4"), "text": "missing"},
             {"path": "../" + videos.name + "/../../x.mp4", "text": "escapes"}]
    table.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with running(table, "--video_root", str(videos)) as url:
        assert requests.get(f"{url}/api/preview/0", timeout=120).ok
        missing = requests.get(f"{url}/api/preview/1", timeout=30)  # inside the table's folder, but not there
        assert missing.status_code == 422 and "No such file" in missing.json()["error"]
        assert requests.get(f"{url}/api/preview/2", timeout=30).json()["error"].startswith("refused")


def test_a_table_without_paths_is_shown_and_keyed_by_row(tmp_path):
    table = tmp_path / "captions.jsonl"
    table.write_text("".join(json.dumps({"video_id": f"id{i}", "text": f"caption {i}", "status": "ok"}) + "\n"
                             for i in range(5)))
    with running(table) as url:
        info = requests.get(f"{url}/api/info", timeout=30).json()
        assert not info["has_path"] and info["key_columns"] == ["row"]
        assert [r["cells"]["video_id"] for r in rows(url)["rows"]] == [f"id{i}" for i in range(5)]
        assert rows(url, q="caption 3")["matched"] == 1
        assert requests.get(f"{url}/api/preview/0", timeout=30).status_code == 404
        assert mark(url, 2, "bad").ok
    assert table.with_name("captions.jsonl.review.csv").read_text().splitlines()[1].startswith("2,bad,")


@pytest.mark.parametrize("content", [b"", b"path,text\nv.mp4,a,b,c\n", b"PAR1 not really"])
def test_an_unreadable_table_is_one_line_and_exit_1(tmp_path, content):
    table = tmp_path / ("t.parquet" if content.startswith(b"PAR1") else "t.csv")
    table.write_bytes(content)
    run = subprocess.run([sys.executable, "-m", "pipeline.review", str(table), "--port", str(free_port())],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 1 and run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1 and run.stderr.startswith(f"error: {table}"), run.stderr


@pytest.fixture(scope="module")
def big_table(tmp_path_factory) -> Path:
    """100k rows as a captioner writes them (segments, flags, raw text, a structured field)."""
    n = 100_000
    rng = np.random.default_rng(0)
    words = np.array("a man woman dog cat runs jumps red blue car street kitchen video shows slowly".split())
    text = [" ".join(words[rng.integers(0, len(words), 30)]) for _ in range(n)]

    def flags(share: float) -> np.ndarray:
        return np.where(rng.random(n) < share, "true", "false")

    table = pd.DataFrame({"path": [f"clips/v{i % 997}.mp4" for i in range(n)],
                          "start": [f"{i % 7}.0" for i in range(n)], "end": [f"{i % 7 + 2}.0" for i in range(n)],
                          "text": text,
                          "status": np.where(rng.random(n) < 0.05, "error", "ok"), "error": "",
                          "repetition": flags(0.1), "truncated": flags(0.1), "text_raw": text,
                          "num_frames_used": "8", "caption_tags": '{"tags": ["a", "b"]}'})
    path = tmp_path_factory.mktemp("big") / "captions.csv"
    table.to_csv(path, index=False)
    return path


def timed(url: str) -> tuple[float, requests.Response]:
    start = time.perf_counter()
    answer = requests.get(url, timeout=60)
    assert answer.ok, answer.text
    return time.perf_counter() - start, answer


def test_100k_rows_first_page_under_2s_and_filters_under_1s(big_table):
    with running(big_table) as url:
        info_s, _ = timed(f"{url}/api/info")
        page_s, first = timed(f"{url}/api/rows?limit=20")
        assert first.json()["matched"] == 100_000 and len(first.json()["rows"]) == 20
        assert info_s + page_s < 2.0, (info_s, page_s)
        for query in ("q=kitchen%20dog", "status=error&repetition=1", "column=path&value=clips/v7.mp4",
                      "q=man&offset=90000&limit=100", "review=none&truncated=0&q=cat", "q=no%20such%20words"):
            seconds, answer = timed(f"{url}/api/rows?{query}")
            assert seconds < 1.0, (query, seconds)
        assert answer.json()["matched"] == 0
        mark_start = time.perf_counter()
        assert mark(url, 99_999, "bad").ok
        assert time.perf_counter() - mark_start < 1.0


@pytest.fixture
def cli_server(captioned, tmp_path) -> Iterator[str]:
    """``python -m pipeline.review`` itself on the captioned table."""
    port = free_port()
    log_path = tmp_path / "review.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.review", str(captioned), "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/api/info", timeout=2).ok:
                    break
            assert time.monotonic() < deadline, "the review server did not come up"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def test_review_page_in_chromium(cli_server, captioned, big_table, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-test.txt")
    executable = chromium()
    count = "document.querySelectorAll('#rows article').length"
    pathless = tmp_path / "pathless.csv"
    pathless.write_text("video_id,text\nid0,a caption\nid1,another\n")
    with running(big_table) as big_url, running(pathless) as pathless_url, sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)  # for wait_for_function
            start = time.perf_counter()
            page.goto(big_url + "/")
            page.wait_for_function(f"{count} === 20", timeout=10000)
            big_load_s = time.perf_counter() - start
            assert "of 100000 matching" in page.text_content("#range")
            start = time.perf_counter()
            page.fill("#f-q", "kitchen dog")
            page.wait_for_function("document.getElementById('range').textContent.includes('(100000 in all)')")
            big_filter_s = time.perf_counter() - start  # includes the page's 250 ms typing pause

            page.goto(pathless_url + "/")
            page.wait_for_function(f"{count} === 2")
            assert "no 'path' column" in page.text_content("#banner") and page.is_visible("#banner")
            assert page.locator(".placeholder").count() == 0

            page.goto(cli_server + "/")
            page.wait_for_function(f"{count} === 7 && document.querySelectorAll('article[data-preview]').length"
                                   " === 7", timeout=60000)
            assert page.locator("article[data-row='0'] .preview img").count() == 1
            assert page.locator("article[data-row='0'] pre").first.text_content() == json.dumps(
                json.loads(STRUCTURED), indent=2)
            assert "broken.mp4" in page.text_content("article[data-row='3'] .placeholder")
            assert "refused" in page.text_content("article[data-row='4'] .placeholder")
            assert page.locator("article[data-row='1'] .badge.flag").text_content() == "repetition"
            page.keyboard.press("j")  # row 1 selected
            page.keyboard.press("g")  # good, then row 2
            page.wait_for_selector("article[data-row='1'].good")
            page.wait_for_selector("article[data-row='2'].selected")
            page.keyboard.press("b")
            page.wait_for_selector("article[data-row='2'].bad")
            page.keyboard.press("k")
            page.keyboard.press("k")  # back on row 1
            page.wait_for_selector("article[data-row='1'].selected")
            page.mouse.move(0, 0)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            page.select_option("#f-status", "error")
            page.wait_for_function(f"{count} === 1")
            assert page.get_attribute("#rows article", "data-row") == "3"
            page.select_option("#f-status", "")
            page.select_option("#f-review", "good")
            page.wait_for_function(f"{count} === 1")
            page.keyboard.press("x")  # cleared
            page.wait_for_function("!document.querySelector('article[data-row=\"1\"]').classList.contains('good')")
        finally:
            browser.close()
    assert big_load_s < 2.0 and big_filter_s < 1.5, (big_load_s, big_filter_s)
    saved = pd.read_csv(captioned.with_name("captions.csv.review.csv"), dtype=str, keep_default_na=False)
    assert saved[["path", "start", "end", "review"]].values.tolist() == [["v1.mp4", "", "", "bad"]]
    assert SCREENSHOT.stat().st_size > 20_000
