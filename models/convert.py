"""Write safetensors beside PyTorch weights, without torch: ``python -m models.convert FOLDER_OR_FILE``.

A folder's ``pytorch_model.bin`` becomes ``model.safetensors``; its shards
``pytorch_model-0000x-of-0000y.bin`` become ``model-0000x-of-0000y.safetensors`` with a
``model.safetensors.index.json``; any other ``.bin``/``.pth``/``.pt`` file given by path
becomes ``<stem>.safetensors`` holding its state dict. Tensors are streamed one at a time
in their stored dtype (bfloat16 stays bfloat16), so memory stays small. The loader reads the
PyTorch files directly too; converting once makes later loads faster and safer to share.
"""
from __future__ import annotations

import argparse
import json
import logging
import struct
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from models.torch_checkpoint import TORCH_SUFFIXES, TorchCheckpointError, read_state_dict

logger = logging.getLogger(__name__)


def write_safetensors(source: Path, target: Path) -> int:
    """Convert one torch file; returns the bytes of tensor data written."""
    tensors = read_state_dict(source)
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        size = np.dtype(tensor.storage.element).itemsize
        for dim in tensor.shape:
            size *= dim
        header[name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for tensor in tensors.values():
            f.write(tensor.raw().tobytes())
    tmp.replace(target)
    return offset


def _target_name(source: Path) -> str:
    if source.name == "pytorch_model.bin":
        return "model.safetensors"
    if source.name.startswith("pytorch_model-"):
        return "model-" + source.name[len("pytorch_model-"):-len(".bin")] + ".safetensors"
    return source.stem + ".safetensors"


def convert(path: Path) -> list[Path]:
    """Convert a folder's PyTorch weights (or one file); returns the files written."""
    if path.is_file():
        sources, index = [path], None
    else:
        index = path / "pytorch_model.bin.index.json"
        sources = (sorted({path / n for n in json.loads(index.read_text())["weight_map"].values()})
                   if index.is_file() else [p for p in [path / "pytorch_model.bin"] if p.is_file()]
                   or sorted(path.glob("pytorch_model-*-of-*.bin")))
        if not sources:
            raise FileNotFoundError(f"no pytorch_model.bin, pytorch_model.bin.index.json or shards in {path}")
    written, total = [], 0
    for source in sources:
        if source.suffix not in TORCH_SUFFIXES:
            raise ValueError(f"{source} is not a PyTorch file ({', '.join(TORCH_SUFFIXES)})")
        target = source.with_name(_target_name(source))
        if target.exists():
            raise FileExistsError(f"{target} exists already; remove it to convert again")
        total += write_safetensors(source, target)
        logger.info("wrote %s", target)
        written.append(target)
    if index is not None and index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        new_index = {"metadata": {"total_size": total},
                     "weight_map": {k: _target_name(Path(v)) for k, v in weight_map.items()}}
        target = path / "model.safetensors.index.json"
        target.write_text(json.dumps(new_index, indent=2))
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> list[Path]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="example:\n  python -m models.convert /models/video-blip-opt-2.7b-ego4d",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a model folder with PyTorch weights, or one .bin/.pth/.pt file")
    args = parser.parse_args(argv)
    try:
        return convert(args.path)
    except (TorchCheckpointError, OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
