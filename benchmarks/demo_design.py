"""Compare designs for the bundled demo model with short cross-entropy runs and their learning curves.

Each candidate of ``configs/demo/design_candidates.yaml`` trains from scratch on the demo's synthetic
data (``python -m pipeline.datasets.synthetic --num_videos 3000 --seed 0``, made once) with the demo's CE
recipe (``configs/demo/ce.yaml``), the file's ``base`` changes and the candidate's own, for its ``updates``. Every ``--eval_every``
updates the training captions ``--val_videos`` validation clips (greedy) and writes them
(``<run>/eval/update-*.json``); each is read by keyword for how often it names the clip's colour, shape
and motion (``pipeline.training.synthetic_accuracy``). The loss comes from the training log.

    python -m benchmarks.demo_design --candidates baseline,patch8 [--work outputs/demo_design]
        [--val_videos 100] [--eval_every 100] [--output benchmarks/results/demo_design.json]

Results accumulate in ``--output`` (one entry per candidate, the newest run replacing an older one), so
each experiment can be committed as it finishes. Times are wall-clock on a shared machine: compare a
candidate's seconds per update with the baseline's from the same session.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from pipeline.config import load_yaml
from pipeline.datasets.captions import load_captions, references
from pipeline.training.synthetic_accuracy import accuracy

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ROOT / "configs" / "demo" / "design_candidates.yaml"
BASE_MODEL = ROOT / "configs" / "demo" / "blip2_opt.json"
CE_RECIPE = ROOT / "configs" / "demo" / "ce.yaml"
LOSS_LINE = re.compile(r"update (\d+): loss ([0-9.]+)")


def merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` merged in, nested dicts key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def prepare_data(work: Path, val_videos: int) -> tuple[Path, Path]:
    """The demo's data and tokenizer (made once under ``work``) and a CSV of the first ``val_videos``
    validation clips' references."""
    data = work / "data"
    if not (data / "test.csv").is_file():
        run([sys.executable, "-m", "pipeline.datasets.synthetic", "--output", str(data), "--num_videos", "3000",
             "--seed", "0"], work / "data.log")
    tokenizer = work / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        run([sys.executable, "-m", "pipeline.training.word_tokenizer", str(data / "train.csv"), "--output",
             str(tokenizer), "--vocab_size", "96"], work / "tokenizer.log")
    val = pd.read_csv(data / "val.csv")
    keep = list(dict.fromkeys(val["path"]))[:val_videos]
    subset = data / f"val_{val_videos}.csv"
    val[val["path"].isin(keep)].to_csv(subset, index=False)
    return tokenizer, subset


def run(command: list[str], log: Path) -> None:
    """Run a step of the recipe with its output in ``log``; a failure stops the benchmark."""
    logger.info("running %s (log: %s)", " ".join(command[2:4]), log)
    with open(log, "w") as sink:
        result = subprocess.run(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"{command[2]} failed (exit {result.returncode}); see {log}")


def curve(run_dir: Path, val_csv: Path) -> list[dict]:
    """Accuracy of each evaluation the run wrote, in update order."""
    truth = references(load_captions(str(val_csv)))
    points = []
    for path in sorted((run_dir / "eval").glob("update-*.json")):
        saved = json.loads(path.read_text())
        scores = accuracy(saved["captions"], truth)
        points.append({"update": saved["update"], "CIDEr": saved["scores"].get("CIDEr"),
                       **{k: scores[k] for k in ("colour", "shape", "motion", "action")},
                       "per_action": {a: row["right"] for a, row in scores["per_action"].items()}})
    return points


def train_candidate(name: str, spec: dict, work: Path, tokenizer: Path, val_csv: Path, eval_every: int) -> dict:
    run_dir = work / name
    model_config = work / f"{name}.json"
    model_config.write_text(json.dumps(merged(json.loads(BASE_MODEL.read_text()), spec.get("model", {})), indent=2))
    options = {"model_config": model_config, "tokenizer": tokenizer, "train_annotations": work / "data/train.csv",
               "val_annotations": val_csv, "output_dir": run_dir, "max_steps": spec["updates"],
               "eval_every": eval_every, "save_every": 0, "keep_last": 1, "num_beams": 1, "log_every": 25,
               **spec.get("train", {})}
    command = [sys.executable, "-m", "pipeline.training.train", "--config", str(CE_RECIPE)]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    log = work / f"{name}.log"
    started = time.perf_counter()
    run(command, log)
    seconds = time.perf_counter() - started
    losses = [(int(u), float(v)) for u, v in LOSS_LINE.findall(log.read_text())]
    return {"note": spec.get("note", ""), "model": spec.get("model", {}), "train": spec.get("train", {}),
            "updates": spec["updates"], "minutes": round(seconds / 60, 2),
            "seconds_per_update": round(seconds / spec["updates"], 3),
            "loss": [{"update": u, "loss": v} for u, v in losses], "curve": curve(run_dir, val_csv),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def table(results: dict) -> str:
    """The last evaluation of each candidate, as a Markdown table."""
    lines = ["| candidate | updates | minutes | final loss | colour | shape | motion | CIDEr |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        last = r["curve"][-1] if r["curve"] else {}
        loss = f"{r['loss'][-1]['loss']:.3f}" if r["loss"] else "-"
        cells = [f"{100 * last[k]:.0f} %" if last.get(k) is not None else "-" for k in ("colour", "shape", "motion")]
        cider = f"{100 * last['CIDEr']:.1f}" if last.get("CIDEr") is not None else "-"
        lines.append(f"| {name} | {r['updates']} | {r['minutes']} | {loss} | {' | '.join(cells)} | {cider} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", required=True, help="comma-separated names from " + str(CANDIDATES.name))
    p.add_argument("--work", default="outputs/demo_design", help="data, runs and logs")
    p.add_argument("--val_videos", type=int, default=100, help="validation clips captioned at each evaluation")
    p.add_argument("--eval_every", type=int, default=100, help="updates between evaluations")
    p.add_argument("--output", default="benchmarks/results/demo_design.json", help="results JSON (accumulates)")
    p.add_argument("--updates", type=int, help="every candidate's run length instead of its own (a quick check)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    specs = load_yaml(CANDIDATES)
    base = specs.pop("base", {})
    specs = {name: merged(base, spec) for name, spec in specs.items()}
    unknown = [n for n in args.candidates.split(",") if n not in specs]
    if unknown:
        raise SystemExit(f"unknown candidate(s) {unknown}; {CANDIDATES} has {sorted(specs)}")
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    tokenizer, val_csv = prepare_data(work, args.val_videos)
    output = ROOT / args.output
    results = json.loads(output.read_text()) if output.is_file() else {}
    for name in args.candidates.split(","):
        if args.updates:
            specs[name] = {**specs[name], "updates": args.updates}
        results[name] = train_candidate(name, specs[name], work, tokenizer, val_csv, args.eval_every)
        output.write_text(json.dumps(results, indent=1))
        print(table({name: results[name]}), flush=True)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
