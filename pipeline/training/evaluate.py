"""Score captions against references with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr (+ SPICE).

Both sides are tokenised with pycocoevalcap's PTBTokenizer (Java), as the COCO caption
evaluation does, then scored by its scorers, so the numbers are comparable with papers
(MSR-VTT CIDEr is reported x100: 0.736 here is "73.6"). SPICE runs only when its Stanford
CoreNLP jars are in pycocoevalcap's ``spice/lib`` (pycocoevalcap downloads them on first
use, which fails offline); otherwise it is skipped with one log line.

Command line:
  python -m pipeline.training.evaluate --references ANN --predictions PRED.csv
      PRED.csv: the captioning runner's output (``path``, ``text``, ``status``) or a CSV
      keyed by ``video_id``. Rows are matched to references by video_id, by the raw path,
      by the resolved file path, or by the file name without extension.
  python -m pipeline.training.evaluate --references ANN --checkpoint CKPT [--split test] \\
      --video_root V --predictions PRED.csv [caption_blip2 flags, e.g. --num_frames 8 --device CPU]
      captions the split with caption_blip2 first (resuming from PRED.csv's rows), then scores.
  python -m pipeline.training.evaluate --gebc ANNOTATION.json --predictions PRED.csv
      Kinetic-GEBC: scores PRED.csv's subject, status_before and status_after columns (from
      ``caption_videollama --task gebc``, rows matched by boundary_id) against the annotation's
      references, one table per caption type.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path

import pandas as pd

from pipeline.datasets import gebc
from pipeline.datasets.captions import FORMATS, CaptionFormatError, CaptionRecord, load_captions, references
from pipeline.datasets.metadata import MetadataError, read_metadata, resolve_video_path

logger = logging.getLogger(__name__)

SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def spice_available() -> bool:
    """True when SPICE can run offline: its Stanford CoreNLP jars are already in place."""
    from pycocoevalcap import spice

    lib = Path(spice.__path__[0]) / "lib"
    return all((lib / jar).is_file() for jar in SPICE_JARS)


@contextlib.contextmanager
def _meteor() -> Iterator:
    """pycocoevalcap's Meteor, whose Java subprocess is ended when the block exits."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        yield meteor
    finally:
        proc = meteor.meteor_p
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
        proc.kill()
        proc.wait()


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """PTB-tokenise, lowercase and drop punctuation, as the COCO caption evaluation does."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in captions.items()})


def score_captions(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                   spice: bool | None = None) -> dict[str, float]:
    """Corpus scores of one caption per video against that video's references.

    Every prediction needs references; references without a prediction are ignored
    (the caller decides whether that is acceptable). Keys: Bleu_1..Bleu_4, METEOR,
    ROUGE_L, CIDEr and, when ``spice`` (None: when its jars are present), SPICE.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise ValueError(f"{len(missing)} predictions have no references, e.g. {missing[:3]}")
    res = ptb_tokenize({k: [text] for k, text in predictions.items()})
    gts = ptb_tokenize({k: references[k] for k in predictions})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"Bleu_{i + 1}": float(b) for i, b in enumerate(bleu)}
    with _meteor() as meteor:
        scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice is None:
        spice = spice_available()
        if not spice:
            logger.info("SPICE skipped: Stanford CoreNLP jars %s are not in pycocoevalcap/spice/lib "
                        "(run pycocoevalcap.spice.get_stanford_models once with network access)", SPICE_JARS)
    if spice:
        from pycocoevalcap.spice.spice import Spice

        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return scores


def match_predictions(table: pd.DataFrame, records: Sequence[CaptionRecord], csv_dir: str | os.PathLike,
                      video_root: str | os.PathLike | None = None) -> dict[str, str]:
    """video_id -> caption for the usable rows of a predictions table (status ``ok`` or no status).

    Rows are matched by a ``video_id`` column if there is one, else by ``path``: the raw
    value as a video id, the resolved file path, or the file name without extension.
    Unmatched rows are logged and left out.
    """
    if "status" in table.columns:
        failed = int((table["status"] != "ok").sum())
        if failed:
            logger.warning("%d prediction rows have status other than ok and are not scored", failed)
        table = table[table["status"] == "ok"]
    ids = {rec.video_id for rec in records}
    if "video_id" in table.columns:
        keys = list(table["video_id"])
    else:
        by_path = {os.path.abspath(rec.path): rec.video_id for rec in records}
        keys = []
        for value in table["path"]:
            resolved = resolve_video_path(value, csv_dir, video_root)
            keys.append(value if value in ids else by_path.get(resolved, Path(value).stem))
    matched = {key: text for key, text in zip(keys, table["text"]) if key in ids}
    if len(matched) < len(table):
        logger.warning("%d prediction rows match no reference video and are not scored", len(table) - len(matched))
    return matched


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--references",
                   help="annotation file (MSR-VTT, MSVD, VATEX, COCO/LAVIS JSON or CSV path,text)")
    p.add_argument("--gebc", metavar="ANNOTATION",
                   help="score event boundary captions instead: a Kinetic-GEBC annotation JSON, whose boundaries "
                        "the predictions' boundary_id column names")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="annotation format (default: detect)")
    p.add_argument("--split", help="MSR-VTT split name (train, validate, test)")
    p.add_argument("--split_file", help="file of video ids to evaluate (e.g. MSVD's test list)")
    p.add_argument("--video_root", help="folder of the videos (default: the annotation file's folder)")
    p.add_argument("--video_template", help='video file name from its id, e.g. "{video_id}.mp4"')
    p.add_argument("--predictions", required=True,
                   help="predictions CSV (path,text[,status] from the captioning runner, or video_id,text); "
                        "with --checkpoint the runner writes (and resumes) it")
    p.add_argument("--checkpoint", help="caption the split with this BLIP-2 checkpoint folder first; "
                                        "other unknown flags go to caption_blip2")
    p.add_argument("--output_json", help="write the scores here as JSON")
    p.add_argument("--spice", choices=["auto", "on", "off"], default="auto",
                   help="SPICE: auto = only when its CoreNLP jars are present")
    return p


def caption_split(records: Sequence[CaptionRecord], predictions: str, checkpoint: str,
                  extra: Sequence[str]) -> None:
    """Write the split's videos to ``<predictions>.videos.csv`` (named after the whole file name, so
    predictions that differ only in format never share it) and caption them with caption_blip2 (which resumes)."""
    from pipeline.captioning import caption_blip2

    videos = Path(predictions).with_name(f"{Path(predictions).name}.videos.csv")
    videos.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"path": [r.path for r in records], "video_id": [r.video_id for r in records]}).to_csv(
        videos, index=False)
    caption_blip2.main([str(videos), "--output", predictions, "--pretrained_model_name_or_path", checkpoint,
                        *extra])


def score_gebc(table: pd.DataFrame, boundaries: pd.DataFrame, spice: bool | None = None
               ) -> dict[str, dict[str, float]]:
    """Per caption type (``gebc.FIELDS``), the scores of the table's rows (status ``ok`` or no status)
    against the references of the boundaries they name by ``boundary_id``."""
    missing = [c for c in ("boundary_id", *gebc.FIELDS) if c not in table.columns]
    if missing:
        raise MetadataError(f"the predictions lack column(s) {missing} (write them with caption_videollama "
                            f"--task gebc)")
    if "status" in table.columns:
        table = table[table["status"] == "ok"]
    refs = gebc.references(boundaries)
    scores = {}
    for field in gebc.FIELDS:
        predictions = {bid: text for bid, text in zip(table["boundary_id"], table[field]) if bid in refs[field]}
        if not predictions:
            raise ValueError(f"no prediction row names a boundary with a {field} reference")
        if len(predictions) < len(refs[field]):
            logger.warning("%s: scoring %d of %d boundaries (the others have no usable prediction)",
                           field, len(predictions), len(refs[field]))
        scores[field] = score_captions(predictions, refs[field], spice)
    return scores


def format_table(scores: Mapping[str, float]) -> str:
    lines = [f"{'metric':<10}{'score':>10}{'x100':>10}"]
    lines += [f"{name:<10}{value:>10.4f}{100 * value:>10.2f}" for name, value in scores.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not args.checkpoint:
        parser.error(f"unrecognized arguments: {' '.join(extra)} (only --checkpoint passes flags on)")
    if (args.references is None) == (args.gebc is None):
        parser.error("give one of --references and --gebc")
    if args.gebc and args.checkpoint:
        parser.error("--checkpoint captions with BLIP-2; caption GEBC boundaries with caption_videollama --task gebc")
    spice = {"auto": None, "on": True, "off": False}[args.spice]
    if args.gebc:
        return _main_gebc(args, spice)
    try:
        records = load_captions(args.references, args.format, args.video_root, args.split,
                                args.split_file, args.video_template)
        if args.checkpoint:
            caption_split(records, args.predictions, args.checkpoint, extra)
        table = read_metadata(args.predictions, required=("text",))
        if "video_id" not in table.columns and "path" not in table.columns:
            raise MetadataError(f"{args.predictions}: needs a 'video_id' or a 'path' column to match references")
        predictions = match_predictions(table, records, Path(args.predictions).resolve().parent, args.video_root)
    except (CaptionFormatError, MetadataError) as exc:
        sys.exit(f"error: {exc}")
    if not predictions:
        sys.exit(f"error: no prediction in {args.predictions} matches a video of {args.references}")
    if len(predictions) < len(records):
        logger.warning("scoring %d of %d reference videos (the others have no usable prediction)",
                       len(predictions), len(records))
    scores = score_captions(predictions, references(records), spice=spice)
    print(format_table(scores))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(
            {"scores": scores, "num_videos": len(predictions), "num_reference_videos": len(records),
             "references": str(args.references), "predictions": str(args.predictions)}, indent=2))
    return scores


def _main_gebc(args: argparse.Namespace, spice: bool | None) -> dict[str, dict[str, float]]:
    try:
        boundaries = gebc.read_boundaries(args.gebc)
        scores = score_gebc(read_metadata(args.predictions), boundaries, spice)
    except (ValueError, OSError) as exc:
        sys.exit(f"error: {exc}")
    for field, field_scores in scores.items():
        print(f"{field}\n{format_table(field_scores)}\n")
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(
            {"scores": scores, "num_boundaries": len(boundaries), "references": str(args.gebc),
             "predictions": str(args.predictions)}, indent=2))
    return scores


if __name__ == "__main__":
    main()
