"""The decode watchdog: decoding in worker processes, bounded in time, never left behind.

A "hanging" video is a real crafted file, not a hook: an AVI followed by 64 GiB of
zeros (a sparse file, so it takes no disk). decord and PyAV scan the zeros for data at
about 15 s per GiB here, the case of the issue's XviD AVI with 1 GB of trailing zeros.
"""
from __future__ import annotations

import csv
import mmap
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.datasets.decode_pool import DecodePool, DecodeTimeoutError, DecoderDiedError, default_timeout
from pipeline.datasets.video import SegmentError, VideoReadError, probe_duration, sample_frames
from pipeline.captioning.runner import RunOptions, run
from tests.colour_captioner import BudgetCaptioner, colour_caption, main as colour_main
from tests.video_factory import write_image, write_index_video

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "colour_captioner.py"
TIMEOUT_MESSAGE = "decoding took longer than 2 s (--decode_timeout); the decoder was stopped"


def write_hanging_avi(path: Path) -> Path:
    shutil.copyfile(ROOT / "examples" / "videos" / "life.avi", path)
    os.truncate(path, path.stat().st_size + (64 << 30))
    return path


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state first), or None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields  # a zombie has finished


def decoders(parent: int) -> list[int]:
    """Live decode-pool workers started by ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if fields and int(fields[1]) == parent and b"pipeline.datasets.decode_pool" in command:
            found.append(int(entry.name))
    return found


def cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_decoder(parent: int, cpu: float = 0.5, within: float = 60) -> int:
    """The first worker of ``parent`` that has spent ``cpu`` seconds decoding (the hanging video's)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for pid in decoders(parent):
            if cpu_seconds(pid) >= cpu:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no decoder of process {parent} got busy within {within} s")


def gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while _stat(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def no_leaks():
    """Fail a test that leaves decoder processes or shared-memory segments behind."""
    shm_before = set(os.listdir("/dev/shm"))
    yield
    assert decoders(os.getpid()) == [], "decoder processes left running"
    assert set(os.listdir("/dev/shm")) <= shm_before, "shared memory segments left behind"


def make_dataset(folder: Path, hanging: int | None, n: int = 3) -> Path:
    """n small videos; the row ``hanging`` (if any) is the crafted hanging AVI."""
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        if i == hanging:
            paths.append(write_hanging_avi(folder / "videos" / "hang.avi"))
        else:
            paths.append(write_index_video(folder / "videos" / f"v{i}.mp4", num_frames=8 + i))
    csv_path = folder / "meta.csv"
    pd.DataFrame({"path": [str(p.relative_to(folder)) for p in paths], "id": range(n)}).to_csv(csv_path, index=False)
    return csv_path


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _mapped(array: np.ndarray) -> bool:
    """Whether the array is a view of a memory mapping (not a copy)."""
    base = array.base
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def test_worker_frames_and_errors_equal_the_in_process_reader(tmp_path, no_leaks):
    videos = [write_index_video(tmp_path / "a.mp4", num_frames=30), ROOT / "examples" / "videos" / "life.avi",
              write_image(tmp_path / "still.png", index=5)]
    calls = [dict(num_frames=8), dict(num_frames=4, height=32), dict(num_frames=4, max_pixels=1536),
             dict(num_frames=3, start=0.5, end=1.5)]
    with DecodePool(2) as pool:
        for video in videos:
            for kwargs in calls if video.suffix != ".png" else calls[:3]:
                frames, indices = pool.sample_frames(video, timeout=30, **kwargs)
                want_frames, want_indices = sample_frames(video, **kwargs)
                assert frames.dtype == np.uint8 and frames.shape == want_frames.shape, (video, kwargs)
                assert np.array_equal(frames, want_frames) and np.array_equal(indices, want_indices)
                assert _mapped(frames), "frames should be the worker's shared memory, not a copy"
            assert pool.probe_duration(video, timeout=30) == probe_duration(video)
        for path, kwargs, kind in ((tmp_path / "missing.mp4", {}, VideoReadError),
                                   (videos[0], dict(start=50.0), SegmentError),
                                   (videos[0], dict(num_frames=0), ValueError)):
            with pytest.raises(kind) as local:
                sample_frames(path, **kwargs)
            with pytest.raises(kind) as remote:
                pool.sample_frames(path, timeout=30, **kwargs)
            assert type(remote.value) is type(local.value) and str(remote.value) == str(local.value)
            assert vars(remote.value) == vars(local.value)  # e.g. VideoReadError's path and problem


def test_pool_timeout_kills_the_worker_and_replaces_it(tmp_path, no_leaks):
    hanging = write_hanging_avi(tmp_path / "hang.avi")
    video = write_index_video(tmp_path / "ok.mp4", num_frames=10)
    with DecodePool(1) as pool:
        first = pool.pids()
        start = time.monotonic()
        with pytest.raises(DecodeTimeoutError, match="decoding took longer than 1 s") as err:
            pool.sample_frames(hanging, timeout=1, num_frames=4)
        assert time.monotonic() - start < 10
        assert err.value.path == str(hanging) and isinstance(err.value, VideoReadError)
        assert gone(first[0], within=5), "the worker over time must be killed"
        frames, _ = pool.sample_frames(video, timeout=30, num_frames=4)
        assert np.array_equal(frames, sample_frames(video, num_frames=4)[0])
        assert pool.pids() != first


def test_closing_the_pool_stops_a_decode_in_flight(tmp_path, no_leaks):
    """What Ctrl-C relies on: close() does not wait for a hung decode; its caller gets an error at once."""
    hanging = write_hanging_avi(tmp_path / "hang.avi")
    pool = DecodePool(1)
    raised: list[BaseException] = []

    def decode() -> None:
        try:
            pool.sample_frames(hanging, timeout=600, num_frames=4)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            raised.append(exc)

    caller = threading.Thread(target=decode)
    caller.start()
    busy_decoder(os.getpid())
    pool.close()
    caller.join(timeout=10)
    assert not caller.is_alive() and len(raised) == 1
    assert isinstance(raised[0], DecoderDiedError) and "died (signal 9)" in str(raised[0])
    with pytest.raises(RuntimeError, match="closed"):
        pool.probe_duration(hanging, timeout=1)


def test_max_decode_pixels_reaches_the_decoder(tmp_path, no_leaks):
    csv_path = make_dataset(tmp_path, hanging=None, n=2)  # 96 x 64 videos
    out = tmp_path / "out.csv"
    run(BudgetCaptioner(fits=10**9), RunOptions(input=str(csv_path), output=str(out), max_decode_pixels=1536))
    rows = read_rows(out)
    assert [r["visual_token_budget"] for r in rows] == [str(48 * 32 // 4)] * 2  # decoded at 48 x 32


def test_default_timeout_scales_with_the_frame_count():
    assert default_timeout(8) == default_timeout(32) == 120
    assert default_timeout(64) == 240 and default_timeout(768) == 2880


@pytest.mark.parametrize("windows", [False, True], ids=["rows", "windows"])
def test_hanging_video_becomes_an_error_row_and_the_run_finishes(tmp_path, no_leaks, windows):
    csv_path = make_dataset(tmp_path, hanging=1)
    flags = ["--window_seconds", "0.5"] if windows else []  # windows: the duration probe is what hangs
    start = time.monotonic()
    colour_main([str(csv_path), "--device", "CPU", "--bs", "2", "--decode_timeout", "2", *flags])
    assert time.monotonic() - start < 30
    rows = read_rows(tmp_path / "meta_caption.csv")
    hung = [r for r in rows if r["path"] == "videos/hang.avi"]
    assert len(hung) == 1 and hung[0]["status"] == "error" and hung[0]["text"] == ""
    assert hung[0]["error"] == f"DecodeTimeoutError: cannot read video {tmp_path / 'videos/hang.avi'}: " \
                               f"{TIMEOUT_MESSAGE}"
    others = [r for r in rows if r["path"] != "videos/hang.avi"]
    assert len(others) >= 2 and all(r["status"] == "ok" for r in others)
    if windows:
        assert {r["path"] for r in others} == {"videos/v0.mp4", "videos/v2.mp4"} and len(others) == 4
    else:
        for row in others:
            assert row["text"] == colour_caption(sample_frames(tmp_path / row["path"], num_frames=4)[0])


def test_killed_worker_becomes_an_error_row_and_a_new_worker_serves_the_rest(tmp_path, no_leaks):
    csv_path = make_dataset(tmp_path, hanging=0)
    killed: list[int] = []

    def kill_the_busy_decoder() -> None:
        pid = busy_decoder(os.getpid())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_the_busy_decoder, daemon=True)
    killer.start()
    start = time.monotonic()
    colour_main([str(csv_path), "--device", "CPU", "--num_workers", "1", "--decode_timeout", "120"])
    killer.join(timeout=5)
    assert killed and time.monotonic() - start < 60
    rows = {r["path"]: r for r in read_rows(tmp_path / "meta_caption.csv")}
    assert rows["videos/hang.avi"]["status"] == "error"
    assert rows["videos/hang.avi"]["error"].endswith("the decoder process died (signal 9)")
    assert rows["videos/v1.mp4"]["status"] == rows["videos/v2.mp4"]["status"] == "ok"


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_no_decoder_outlives_its_run(tmp_path, how):
    """Ctrl-C stops the run and its decoders at once; a killed run's decoders die with it."""
    csv_path = make_dataset(tmp_path, hanging=0, n=1)
    cmd = [sys.executable, str(SCRIPT), str(csv_path), "--device", "CPU", "--decode_timeout", "600"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        worker = busy_decoder(proc.pid)
        proc.send_signal(how)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert gone(worker, within=5)
