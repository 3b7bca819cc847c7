"""Runs with decoding in worker processes (the default) against decoding in threads (``--decode_timeout 0``).

The videos are ``examples/videos.csv`` (seven clips), and ``--copies N`` repeats them N times
under symlinked paths so the per-video cost stands out from the decoders' start-up. Two
captioners: the model-free colour baseline (8 frames), where decoding is all the work, and
the bundled demo BLIP-2 (``examples/demo_model``: 8 frames, beam 5), a real run. Each
captioner is built once and warmed up in both modes (so graphs are compiled); then the
timed runs alternate the two modes, swapping which goes first on every repeat. A run's
time is the runner's own ``RunSummary.seconds``, which includes starting and stopping
the decoder processes. The "cli" rows time the README's main job as users run it, one
process per run (``python -m pipeline.captioning.caption_blip2 examples/videos.csv`` with
the demo model: imports, model loading and graph compilation included), alternating too. Peak RSS is the main process's high-water mark during each run
(reset before it through /proc/self/clear_refs); a decoder process's own peak is measured
apart, as the largest high-water mark of two workers that decoded every example video.

    python -m benchmarks.bench_decode [--repeats 5] [--captioners colour,demo] [--output benchmarks/results/decode.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pandas as pd

from pipeline import distributed
from pipeline.captioning.caption_colour import ColourCaptioner
from pipeline.captioning.runner import Captioner, RunOptions, run
from pipeline.datasets.decode_pool import DecodePool, default_timeout

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "videos.csv"
MODES = {"processes": None, "threads": 0.0}  # RunOptions.decode_timeout: the default limit, or none (threads)


def demo_captioner() -> Captioner:
    from pipeline.captioning.caption_blip2 import Blip2Captioner

    return Blip2Captioner(str(ROOT / "examples" / "demo_model"))


CAPTIONERS: dict[str, tuple[Callable[[], Captioner], list[int]]] = {
    "colour": (lambda: ColourCaptioner(num_frames=8), [1, 10]),  # captioner, --copies to time
    "demo": (demo_captioner, [1]),
}


def examples_csv(folder: Path, copies: int) -> Path:
    """examples/videos.csv with every video ``copies`` times, under distinct (symlinked) paths."""
    data = pd.read_csv(EXAMPLES, dtype=str)
    rows = []
    for copy in range(copies):
        for record in data.to_dict("records"):
            source = (EXAMPLES.parent / record["path"]).resolve()
            link = folder / f"copy{copy}" / source.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source)
            rows.append({**record, "path": str(link)})
    path = folder / f"videos_x{copies}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb(pid: str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decoder_peak_rss_mb(num_frames: int = 8) -> float:
    """The largest peak RSS of two decoder processes after each decoded every example video."""
    paths = [EXAMPLES.parent / p for p in pd.read_csv(EXAMPLES, dtype=str)["path"]]
    with DecodePool(2) as pool:
        for path in paths * 2:
            pool.sample_frames(path, timeout=default_timeout(num_frames), num_frames=num_frames)
        return max(_peak_rss_mb(str(pid)) for pid in pool.pids())


def timed_run(captioner: Captioner, csv_path: Path, out: Path, mode: str) -> dict:
    reset = _reset_peak_rss()
    summary = run(captioner, RunOptions(input=str(csv_path), output=str(out), bs=4, num_workers=2,
                                        decode_timeout=MODES[mode]))
    assert summary.done == len(pd.read_csv(csv_path)), f"{mode}: {summary.failed} rows failed"
    return {"seconds": summary.seconds, "decode_wait_seconds": summary.decode_wait_seconds,
            "peak_rss_mb": _peak_rss_mb() if reset else None}


def bench(name: str, captioner: Captioner, csv_path: Path, work: Path, repeats: int) -> dict:
    for mode in MODES:  # warm-up: compiled graphs, imports, page cache
        timed_run(captioner, csv_path, work / f"warm_{mode}.csv", mode)
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for repeat in range(repeats):
        order = list(MODES) if repeat % 2 == 0 else list(MODES)[::-1]
        for mode in order:
            results[mode].append(timed_run(captioner, csv_path, work / f"{mode}_{repeat}.csv", mode))
    return _entry(name, len(pd.read_csv(csv_path)), results)


def cli_run(out: Path, mode: str) -> dict:
    """One whole command-line run of the demo model: wall seconds and the main process's peak RSS."""
    cmd = [sys.executable, "-m", "pipeline.captioning.caption_blip2", str(EXAMPLES), "--device", "CPU",
           "--pretrained_model_name_or_path", str(ROOT / "examples" / "demo_model"), "--output", str(out)]
    if MODES[mode] is not None:
        cmd += ["--decode_timeout", str(MODES[mode])]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=out.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, which also gave its rusage
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    return {"seconds": seconds, "decode_wait_seconds": None, "peak_rss_mb": usage.ru_maxrss / 1024}


def bench_cli(work: Path, repeats: int) -> dict:
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for repeat in range(repeats):
        order = list(MODES) if repeat % 2 == 0 else list(MODES)[::-1]
        for mode in order:
            results[mode].append(cli_run(work / f"cli_{mode}_{repeat}.csv", mode))
    return _entry("cli demo", len(pd.read_csv(EXAMPLES)), results)


def _entry(name: str, videos: int, results: dict[str, list[dict]]) -> dict:
    entry: dict = {"captioner": name, "videos": videos}
    for mode, runs in results.items():
        rss = [r["peak_rss_mb"] for r in runs if r["peak_rss_mb"] is not None]
        waits = [r["decode_wait_seconds"] for r in runs if r["decode_wait_seconds"] is not None]
        entry[mode] = {"seconds": [round(r["seconds"], 4) for r in runs],
                       "median_seconds": round(statistics.median(r["seconds"] for r in runs), 4),
                       "median_decode_wait_seconds": round(statistics.median(waits), 4) if waits else None,
                       "peak_rss_mb": round(max(rss), 1) if rss else None}
    entry["ratio_processes_to_threads"] = round(entry["processes"]["median_seconds"]
                                                / entry["threads"]["median_seconds"], 4)
    return entry


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(entries: list[dict]) -> None:
    header = (f"{'captioner':<9} {'videos':>6} {'processes s':>12} {'threads s':>10} {'ratio':>6} "
              f"{'wait p/t s':>12} {'RSS p/t MB':>14}")
    print(header)
    print("-" * len(header))
    for e in entries:
        p, t = e["processes"], e["threads"]
        print(f"{e['captioner']:<9} {e['videos']:>6} {p['median_seconds']:>12.3f} {t['median_seconds']:>10.3f} "
              f"{e['ratio_processes_to_threads']:>6.3f} "
              f"{_seconds(p['median_decode_wait_seconds']):>5}/{_seconds(t['median_decode_wait_seconds']):<6} "
              f"{p['peak_rss_mb'] or 0:>6.0f}/{t['peak_rss_mb'] or 0:<7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--captioners", default="colour,demo", help=f"comma-separated, of {sorted(CAPTIONERS)}")
    parser.add_argument("--cli_repeats", type=int, default=3, help="whole command-line demo runs per mode (0: none)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "decode.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    distributed.setup("CPU")
    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.captioners.split(","):
            build, copies_list = CAPTIONERS[name]
            captioner = build()
            for copies in copies_list:
                folder = work / f"{name}_x{copies}"
                folder.mkdir()
                entries.append(bench(name, captioner, examples_csv(folder, copies), folder, args.repeats))
                print_table(entries[-1:])
        if args.cli_repeats:
            entries.append(bench_cli(work, args.cli_repeats))
            print_table(entries[-1:])
    print()
    print_table(entries)
    decoder_peak = decoder_peak_rss_mb()
    print(f"largest decoder process peak RSS: {decoder_peak:.0f} MB")
    result = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count()},
              "repeats": args.repeats, "bs": 4, "num_workers": 2,
              "decoder_process_peak_rss_mb": round(decoder_peak, 1), "runs": entries}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
