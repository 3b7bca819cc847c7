"""Reliability at scale: one run per output, runs that survive bad shards and dying processes,
settings and checkpoint folders checked before any model loads, and crashed runs' leftovers."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.captioning import attempts, caption_blip2, caption_colour, lock
from tests.colour_captioner import main as colour_main
from tests.msrun import count_lines, run_msrun
from tests.test_runner import ROOT, SCRIPT, _env, expected_caption, make_dataset, read_rows

DEMO_MODEL = ROOT / "examples" / "demo_model"


def _write_lock(output: Path, host: str, pid: int, pid_started: str = "", age: float = 0.0) -> Path:
    path = lock.lock_path(output)
    path.write_text(json.dumps({"host": host, "pid": pid, "pid_started": pid_started, "run_id": "old",
                                "started": time.time() - age}))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_second_run_on_one_output_refuses_and_no_row_is_lost(tmp_path):
    n = 12
    csv_path = make_dataset(tmp_path, n)
    out = tmp_path / "meta_caption.csv"
    log = tmp_path / "calls.txt"
    first = subprocess.Popen([sys.executable, str(SCRIPT), str(csv_path), "--bs", "2", "--device", "CPU"], cwd=ROOT,
                             env=_env(CAPTION_SLEEP="0.4", CAPTION_CALL_LOG=str(log)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not lock.lock_path(out).exists() and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(SystemExit) as err:
            colour_main([str(csv_path), "--device", "CPU"])
        assert f"pid {first.pid}" in str(err.value) and "would lose rows" in str(err.value)
    finally:
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(f"videos/v{i:02d}.mp4" for i in range(n))
    assert {r["status"] for r in rows} == {"ok"} and count_lines(log) == n
    assert not lock.lock_path(out).exists()


def test_stale_locks_are_taken_over_and_live_ones_are_not(tmp_path):
    out = tmp_path / "out.csv"
    host = socket.gethostname()
    gone = subprocess.Popen(["true"])
    gone.wait()
    # Same host, process gone: taken over without --force.
    _write_lock(out, host, gone.pid)
    held = lock.acquire(out, "new")
    assert json.loads(lock.lock_path(out).read_text())["pid"] == os.getpid()
    held.release()
    assert not lock.lock_path(out).exists()
    # Same host, a live process: refused, with or without --force.
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        _write_lock(out, host, sleeper.pid, lock._process_started(sleeper.pid), age=600)
        for force in (False, True):
            with pytest.raises(lock.OutputLockedError, match=f"pid {sleeper.pid} on {host}"):
                lock.acquire(out, "new", force=force)
        # The same pid reused by another process (its start time differs): the holder is dead.
        _write_lock(out, host, sleeper.pid, "1")
        lock.acquire(out, "new").release()
    finally:
        sleeper.kill()
        sleeper.wait()
    # Another host: a fresh heartbeat is never taken; a stopped one only with --force.
    _write_lock(out, "other-node", 1)
    with pytest.raises(lock.OutputLockedError, match="stop it"):
        lock.acquire(out, "new", force=True)
    _write_lock(out, "other-node", 1, age=lock.STALE_SECONDS + 30)
    with pytest.raises(lock.OutputLockedError, match="--force"):
        lock.acquire(out, "new")
    lock.acquire(out, "new", force=True).release()


def test_lock_heartbeat_and_release_leave_a_newer_holder_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_SECONDS", 0.05)
    out = tmp_path / "out.csv"
    held = lock.acquire(out, "mine")
    path = lock.lock_path(out)
    os.utime(path, (time.time() - 300, time.time() - 300))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5, "the heartbeat keeps the lock fresh"
    # Someone took the lock over (e.g. with --force): releasing must not delete theirs.
    _write_lock(out, "other-node", 1)
    held.release()
    assert json.loads(path.read_text())["host"] == "other-node"


def test_msrun_rank_whose_rows_all_fail_does_not_fail_the_job(tmp_path):
    n = 6
    # Round-robin sharding gives rank 1 the odd rows: all missing files.
    csv_path = make_dataset(tmp_path, n, bad={i: "missing" for i in range(1, n, 2)})
    result = run_msrun(SCRIPT, [str(csv_path), "--bs", "2", "--device", "CPU"], cwd=tmp_path)
    assert result.returncode == 0, result.problems
    rows = read_rows(tmp_path / "meta_caption.csv")
    assert sorted(r["path"] for r in rows) == sorted(f"videos/v{i:02d}.mp4" for i in range(n))
    assert [r["status"] for r in rows] == ["ok", "error"] * (n // 2)
    assert "rank 1 of 2" in result.logs


def test_row_that_kills_the_process_is_tried_alone_then_recorded(tmp_path):
    n = 8
    csv_path = make_dataset(tmp_path, n)
    captions = [expected_caption(tmp_path, f"videos/v{i:02d}.mp4") for i in range(n)]
    killer = next(i for i in range(3, n) if captions.count(captions[i]) == 1)  # mid-batch, and only it
    out = tmp_path / "meta_caption.csv"
    log = tmp_path / "calls.txt"
    cmd = [sys.executable, str(SCRIPT), str(csv_path), "--bs", "3", "--device", "CPU"]
    env = _env(CAPTION_EXIT_ON=captions[killer], CAPTION_CALL_LOG=str(log))
    codes = [subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300).returncode for _ in range(3)]
    assert codes == [3, 3, 0], "it dies in a batch, then alone, then the row is recorded"
    rows = {r["path"]: r for r in read_rows(out)}
    assert len(rows) == n
    died = rows.pop(f"videos/v{killer:02d}.mp4")
    assert died["status"] == "error" and "died while captioning this row 2 times" in died["error"]
    assert {r["status"] for r in rows.values()} == {"ok"}
    calls = log.read_text().splitlines()
    assert sorted(calls) == sorted(c for i, c in enumerate(captions) if i != killer), "each other row once"
    assert not list(tmp_path.glob("*.inflight")) and not list(tmp_path.glob("*.attempts.json"))


def test_deaths_an_earlier_version_counted_still_count_for_the_csv_output(tmp_path):
    """Earlier versions named the in-flight and attempts files after the output's stem (out_part1.inflight,
    out.attempts.json) for every format: a CSV output settles them, a Parquet output leaves them."""
    killer, other = {"path": "a.mp4"}, {"path": "b.mp4"}
    (tmp_path / "out.attempts.json").write_text(json.dumps([{"cells": killer, "attempts": 1}]))
    (tmp_path / "out_part1.inflight").write_text(json.dumps(killer) + "\n")
    (tmp_path / "out.csv.part0.inflight").write_text(json.dumps(other) + "\n")
    assert not attempts.pending(tmp_path / "out.parquet")
    spent = attempts.settle(tmp_path / "out.csv", frozenset(), max_attempts=2)
    assert [(s.cells, s.attempts) for s in spent] == [(killer, 2)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv.attempts.json"]
    assert {key: s.attempts for key, s in attempts.load_suspects(tmp_path / "out.csv").items()} == {"b.mp4": 1}
    # an output without a suffix keeps its attempts file's name
    (tmp_path / "bare.attempts.json").write_text(json.dumps([{"cells": other, "attempts": 1}]))
    assert attempts.settle(tmp_path / "bare", frozenset(), max_attempts=2) == []
    assert [s.attempts for s in attempts.load_suspects(tmp_path / "bare").values()] == [1]


def test_exceptions_do_not_count_as_deaths(tmp_path, monkeypatch):
    csv_path = make_dataset(tmp_path, 4)
    monkeypatch.setenv("CAPTION_SLEEP", "0")

    def interrupt(self, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(caption_colour.ColourCaptioner, "generate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        caption_colour.main([str(csv_path), "--device", "CPU"])
    assert not list(tmp_path.glob("*.inflight")) and not lock.lock_path(tmp_path / "meta_caption.csv").exists()


@pytest.mark.parametrize("flags, named", [
    (["--max_new_tokens", "0"], "--max_new_tokens"),
    (["--num_beams", "0"], "--num_beams"),
    (["--min_new_tokens", "40", "--max_new_tokens", "10"], "--min_new_tokens (40) is above --max_new_tokens"),
    (["--num_frames", "0"], "--num_frames"),
    (["--max_attempts", "0"], "--max_attempts"),
    (["--repetition_penalty", "0"], "--repetition_penalty must be positive"),
    (["--do_sample", "--temperature", "0"], "--temperature must be positive"),
])
def test_bad_generation_settings_are_refused_before_any_model_load(tmp_path, flags, named):
    csv_path = make_dataset(tmp_path, 1)
    missing_model = tmp_path / "no_such_model"  # loading it would fail: the check must come first
    with pytest.raises(SystemExit) as err:
        caption_blip2.main([str(csv_path), "--pretrained_model_name_or_path", str(missing_model), *flags])
    assert named in str(err.value)
    assert not (tmp_path / "meta_caption.csv").exists()


def test_run_with_nothing_left_does_not_load_the_model(tmp_path, capsys):
    csv_path = make_dataset(tmp_path, 3)
    colour_main([str(csv_path), "--device", "CPU"])
    capsys.readouterr()
    caption_blip2.main([str(csv_path), "--pretrained_model_name_or_path", str(tmp_path / "no_such_model")])
    assert "nothing to caption: all 3 rows are already recorded" in capsys.readouterr().out


def _broken_folders(root: Path) -> dict[str, tuple[Path, str]]:
    """Copies of the demo model, each broken one way, with what its error must say."""
    cases = {}
    for name in ("tokenizer", "weights", "config", "model_type"):
        shutil.copytree(DEMO_MODEL, root / name)
    (root / "tokenizer" / "tokenizer.json").unlink()
    cases["tokenizer"] = (root / "tokenizer", "No tokenizer in")
    weights = root / "weights" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    cases["weights"] = (root / "weights", "model.safetensors is damaged or incomplete")
    (root / "config" / "config.json").write_text('{"model_type": "blip-2",')
    cases["config"] = (root / "config", "config.json is not valid JSON")
    config = json.loads((root / "model_type" / "config.json").read_text())
    config.update(model_type="blip-7", architectures=None)
    (root / "model_type" / "config.json").write_text(json.dumps(config))
    cases["model_type"] = (root / "model_type", "Unsupported model: model_type='blip-7'")
    return cases


def test_broken_checkpoint_folders_give_one_line_errors(tmp_path):
    csv_path = make_dataset(tmp_path, 1)
    for name, (folder, said) in _broken_folders(tmp_path / "models").items():
        with pytest.raises(SystemExit) as err:
            caption_blip2.main([str(csv_path), "--pretrained_model_name_or_path", str(folder), "--device", "CPU",
                                "--output", str(tmp_path / f"{name}.csv")])
        message = str(err.value)
        assert said in message and "\n" not in message, (name, message)
        assert not lock.lock_path(tmp_path / f"{name}.csv").exists()


def test_leftovers_of_crashed_runs_on_this_output_are_removed(tmp_path):
    csv_path = make_dataset(tmp_path, 2)
    leftovers = [tmp_path / ".meta_caption.csv.0a1b2c.tmp", tmp_path / ".meta_caption.csv.part1.csv.3d4e.tmp",
                 tmp_path / ".meta_caption_part1.csv.5f6a.tmp"]  # the last: a part named by an earlier version
    for path in leftovers:
        path.write_text("torn")
    dead_sync = tmp_path / ".meta_caption.csv.sync-abc123"
    dead_sync.mkdir()
    (dead_sync / "started.0").touch()
    other_run = tmp_path / ".other.csv.sync-def456"  # another output's run: not ours to remove
    other_run.mkdir()
    colour_main([str(csv_path), "--device", "CPU"])
    assert not any(p.exists() for p in leftovers) and not dead_sync.exists()
    assert other_run.exists()


def test_help_shows_model_defaults_and_only_flags_the_script_reads(capsys):
    with pytest.raises(SystemExit):
        caption_blip2.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("beam search width (1: greedy) (default: 5)", "(default: 32)", "(default: 8)"):
        assert default in text
    with pytest.raises(SystemExit):
        caption_colour.main(["--help"])
    text = capsys.readouterr().out
    for ignored in ("--pretrained_model_name_or_path", "--question", "--max_new_tokens", "--dtype"):
        assert ignored not in text
