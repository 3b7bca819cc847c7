"""Caption annotations in the formats datasets ship, read into one representation.

Formats (``format=`` name, what auto-detection looks for):

- ``msrvtt``: MSR-VTT ``videodatainfo.json``: ``{"videos": [{"video_id", "split", ...}],
  "sentences": [{"video_id", "caption"}]}``; ``split`` selects ``train``/``validate``/``test``.
- ``msvd``: a text file of ``<video_id> <caption>`` lines (``#`` lines are comments);
  the split comes from a list of video ids (``split_file``).
- ``vatex``: ``[{"videoID", "enCap": [...]}, ...]`` (one file per split).
- ``coco``: COCO-caption JSON ``{"annotations": [{"image_id", "caption"}], "images":
  [{"id", "file_name"}]}`` (``images`` optional; ``file_name`` gives the video's file).
- ``lavis``: LAVIS' list ``[{"video": "x.mp4", "caption": str or [str], "image_id"?}]``.
- ``csv``: our metadata CSV, ``path`` and ``text``; several rows per path are several
  references. The raw ``path`` value is the video id.
- ``gebc``: a Kinetic-GEBC boundary annotation ``{"<video_id>": [{"boundary_id",
  "timestamp", "subject", "status_before", "status_after", ...}]}``. Each boundary gives one
  record per caption type (``<boundary_id>:<type>``), holding the boundary's frame window
  (``start``/``end``), the question for that type (``gebc_questions``) and the type as its
  ``group`` (see ``pipeline.datasets.gebc.caption_records``).

Each video becomes one ``CaptionRecord`` holding all its references, in file order.
Training uses one sample per (video, caption) pair (``training_samples``); evaluation
uses the records themselves (one sample per video, all references).

Video files: a format that names the file (coco ``file_name``, lavis ``video``, csv
``path``) is resolved against ``video_root`` (default: the annotation file's folder).
Otherwise the file is ``video_root/<template>`` when ``video_template`` is given
(``"{video_id}.mp4"``), else ``video_root/<video_id>.<ext>`` for the first of
``VIDEO_EXTENSIONS`` that exists. Missing files are not an error here (the data loader
skips unreadable videos); one warning says how many were not found.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.datasets.metadata import MetadataError, read_metadata, resolve_video_path

logger = logging.getLogger(__name__)

FORMATS = ("msrvtt", "msvd", "vatex", "coco", "lavis", "csv", "gebc")
VIDEO_EXTENSIONS = ("mp4", "avi", "webm", "mkv")

StrPath = str | os.PathLike


class CaptionFormatError(ValueError):
    """An annotation file cannot be read; the message names the file and what was expected."""


@dataclass(frozen=True)
class CaptionRecord:
    """A video (or a part of one) with its reference captions.

    ``start``/``end``: the seconds frames are sampled from (None: the whole video).
    ``question``: the text that fills the prompt's ``{question}`` for this sample (None: the
    prompt as it is). ``group``: the caption type scores are reported under (GEBC's subject,
    status_before, status_after; None: one table).
    """

    video_id: str
    path: str
    captions: tuple[str, ...]
    start: float | None = None
    end: float | None = None
    question: str | None = None
    group: str | None = None


class _Grouper:
    """Collects captions per video id, keeping first-seen order of videos and captions."""

    def __init__(self) -> None:
        self.captions: dict[str, list[str]] = {}
        self.files: dict[str, str] = {}

    def add(self, video_id: Any, caption: Any, file: str | None = None) -> None:
        key = str(video_id)
        self.captions.setdefault(key, [])
        if caption is not None and str(caption).strip():
            self.captions[key].append(str(caption).strip())
        if file and key not in self.files:
            self.files[key] = file


def _fail(path: Path, problem: str) -> CaptionFormatError:
    return CaptionFormatError(f"{path}: {problem}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise _fail(path, f"not valid JSON ({exc})") from None


def detect_format(path: StrPath) -> str:
    """Guess the format from the file suffix and, for JSON, its top-level structure."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix == ".txt":
        return "msvd"
    if suffix != ".json":
        raise _fail(path, f"cannot tell the format from the suffix {suffix!r}; expected .json "
                          f"(msrvtt, vatex, coco, lavis), .txt (msvd) or .csv, or pass format= one of {FORMATS}")
    return _json_format(path, _read_json(path))


def _json_format(path: Path, data: Any) -> str:
    if isinstance(data, dict):
        if "sentences" in data and "videos" in data:
            return "msrvtt"
        if "annotations" in data:
            return "coco"
        boundaries = next(iter(data.values()), None)
        if isinstance(boundaries, list) and boundaries and isinstance(boundaries[0], dict) \
                and "timestamp" in boundaries[0]:
            return "gebc"
        found = f"a JSON object with keys {sorted(data)[:10]}"
    elif isinstance(data, list) and data and isinstance(data[0], dict):
        if "videoID" in data[0] and "enCap" in data[0]:
            return "vatex"
        if "caption" in data[0] and ("video" in data[0] or "image_id" in data[0]):
            return "lavis"
        found = f"a list of objects with keys {sorted(data[0])[:10]}"
    else:
        found = f"a {type(data).__name__}" + (" (empty)" if not data else "")
    raise _fail(path, f"unknown caption JSON: found {found}; expected an object with 'videos' and "
                      f"'sentences' (MSR-VTT), an object with 'annotations' (COCO caption), a list of "
                      f"{{'videoID', 'enCap'}} (VATEX), a list of {{'video', 'caption'}} (LAVIS) or an "
                      f"object of videos' boundary lists with 'timestamp' (Kinetic-GEBC)")


def _items(path: Path, data: Any, key: str, fields: Iterable[str]) -> list[dict]:
    """``data[key]`` (or data itself when key is empty) as a list of dicts having ``fields``."""
    if key and not isinstance(data, dict):
        raise _fail(path, f"expected a JSON object with a '{key}' list, found a {type(data).__name__}")
    items = data.get(key) if key else data
    where = f"'{key}'" if key else "the top-level list"
    if not isinstance(items, list):
        raise _fail(path, f"{where} must be a list, found {type(items).__name__}")
    for i, item in enumerate(items):
        missing = [f for f in fields if not isinstance(item, dict) or f not in item]
        if missing:
            raise _fail(path, f"entry {i} of {where} lacks {missing}; found {item!r:.200}")
    return items


def _msrvtt(path: Path, data: Any, split: str | None) -> _Grouper:
    videos = _items(path, data, "videos", ["video_id"])
    sentences = _items(path, data, "sentences", ["video_id", "caption"])
    if split is not None:
        splits = {str(v.get("split")) for v in videos}
        if split not in splits:
            raise _fail(path, f"no video has split {split!r}; splits in the file: {sorted(splits)}")
        videos = [v for v in videos if str(v.get("split")) == split]
    groups = _Grouper()
    for video in videos:
        groups.add(video["video_id"], None)
    for sentence in sentences:
        if str(sentence["video_id"]) in groups.captions:
            groups.add(sentence["video_id"], sentence["caption"])
    return groups


def _msvd(path: Path) -> _Grouper:
    groups = _Grouper()
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        video_id, _, caption = line.partition(" ")
        if not caption.strip():
            raise _fail(path, f"line {number} has no caption after the video id: {line!r:.200}; "
                              f"expected '<video_id> <caption>' per line")
        groups.add(video_id, caption)
    return groups


def _vatex(path: Path, data: Any) -> _Grouper:
    groups = _Grouper()
    for item in _items(path, data, "", ["videoID", "enCap"]):
        for caption in item["enCap"]:
            groups.add(item["videoID"], caption)
    return groups


def _coco(path: Path, data: Any) -> _Grouper:
    groups = _Grouper()
    images = _items(path, data, "images", ["id"]) if "images" in data else []
    files = {str(img["id"]): img.get("file_name") for img in images}
    for ann in _items(path, data, "annotations", ["image_id", "caption"]):
        groups.add(ann["image_id"], ann["caption"], files.get(str(ann["image_id"])))
    return groups


def _lavis(path: Path, data: Any) -> _Grouper:
    groups = _Grouper()
    for i, item in enumerate(_items(path, data, "", ["caption"])):
        video = item.get("video")
        if video is None and "image_id" not in item:
            raise _fail(path, f"entry {i} has neither 'video' nor 'image_id': {item!r:.200}")
        video_id = item.get("image_id", Path(str(video)).stem if video else None)
        captions = item["caption"] if isinstance(item["caption"], list) else [item["caption"]]
        for caption in captions:
            groups.add(video_id, caption, video)
    return groups


def _csv(path: Path) -> _Grouper:
    try:
        table = read_metadata(path, required=("path", "text"), warn_duplicates=False)
    except MetadataError as exc:
        raise CaptionFormatError(str(exc)) from None
    groups = _Grouper()
    for video, text in zip(table["path"], table["text"]):
        groups.add(video, text, video)
    return groups


def _resolver(video_root: Path, template: str | None):
    """Map (video_id, file named by the annotations or None) to a video path."""
    try:
        names = {entry.name for entry in os.scandir(video_root)}
    except OSError:
        names = set()

    def resolve(video_id: str, file: str | None) -> tuple[str, bool]:
        if file is not None:
            full = resolve_video_path(file, video_root)
            return full, os.path.exists(full)
        if template is not None:
            full = os.path.abspath(os.path.join(video_root, template.format(video_id=video_id)))
            return full, os.path.exists(full)
        for ext in VIDEO_EXTENSIONS:
            if f"{video_id}.{ext}" in names:
                return os.path.abspath(os.path.join(video_root, f"{video_id}.{ext}")), True
        return os.path.abspath(os.path.join(video_root, f"{video_id}.{VIDEO_EXTENSIONS[0]}")), False

    return resolve


def _read_ids(split_file: StrPath) -> set[str]:
    path = Path(split_file)
    if not path.is_file():
        raise CaptionFormatError(f"{path}: split file not found; expected one video id per line")
    return {line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()}


def load_captions(annotation_path: StrPath, format: str = "auto", video_root: StrPath | None = None,
                  split: str | None = None, split_file: StrPath | None = None,
                  video_template: str | None = None, gebc_questions: StrPath | None = None,
                  boundary_window: float | None = None) -> list[CaptionRecord]:
    """Read an annotation file into one ``CaptionRecord`` per video (see the module doc).

    split: MSR-VTT's split name (``train``, ``validate``, ``test``); other formats keep
    splits in separate files. split_file: a file of video ids (one per line) to keep
    (MSVD's split lists; works for every format). Videos without any caption are dropped.
    gebc_questions, boundary_window: GEBC's question file and seconds around a boundary
    (defaults: ``pipeline.datasets.gebc``'s).
    """
    path = Path(annotation_path)
    if not path.is_file():
        raise CaptionFormatError(f"{path}: annotation file not found")
    if format not in ("auto", *FORMATS):
        raise CaptionFormatError(f"{path}: unknown format {format!r}; choose auto or one of {FORMATS}")
    if format == "auto":
        format = detect_format(path)
    if split is not None and format != "msrvtt":
        raise CaptionFormatError(f"{path}: split={split!r} only applies to MSR-VTT's videodatainfo.json; "
                                 f"for {format} use the split's own file or split_file")
    if format == "gebc":
        return _gebc(path, video_root, split_file, video_template, gebc_questions, boundary_window)
    if format == "csv":
        groups = _csv(path)
    elif format == "msvd":
        groups = _msvd(path)
    else:
        data = _read_json(path)
        if format == "msrvtt":
            groups = _msrvtt(path, data, split)
        elif format == "vatex":
            groups = _vatex(path, data)
        elif format == "coco":
            groups = _coco(path, data)
        else:
            groups = _lavis(path, data)
    keep = _read_ids(split_file) if split_file is not None else None
    root = Path(video_root) if video_root is not None else path.parent
    resolve = _resolver(root, video_template)
    records, missing = [], []
    for video_id, captions in groups.captions.items():
        if not captions or (keep is not None and video_id not in keep):
            continue
        video_path, exists = resolve(video_id, groups.files.get(video_id))
        if not exists:
            missing.append(video_path)
        records.append(CaptionRecord(video_id, video_path, tuple(captions)))
    if not records:
        raise _fail(path, f"no captioned videos found (format {format}"
                          + (f", split {split!r}" if split else "")
                          + (f", split_file {split_file}" if split_file else "") + ")")
    if missing:
        logger.warning("%s: %d of %d videos not found, e.g. %s (the loader will skip them)",
                       path, len(missing), len(records), missing[0])
    return records


def _gebc(path: Path, video_root: StrPath | None, split_file: StrPath | None, video_template: str | None,
          questions: StrPath | None, window: float | None) -> list[CaptionRecord]:
    from pipeline.datasets import gebc

    keep = _read_ids(split_file) if split_file is not None else None
    records = gebc.caption_records(path, video_root=video_root, video_template=video_template,
                                   questions=questions, window=window, video_ids=keep)
    if not records:
        raise _fail(path, "no boundary has a reference caption (a test split has none: caption it instead)")
    return records


def training_samples(records: Iterable[CaptionRecord]) -> list[CaptionRecord]:
    """One sample per (video, caption) pair, each a record holding that one caption."""
    return [replace(rec, captions=(caption,)) for rec in records for caption in rec.captions]


def references(records: Iterable[CaptionRecord]) -> dict[str, list[str]]:
    """video_id -> all its reference captions (for scoring and CIDEr-D's document frequencies)."""
    return {rec.video_id: list(rec.captions) for rec in records}
