"""Training checkpoints: trainable weights, optimizer moments, step, data position and RNG state.

Layout of ``<output_dir>/checkpoint-<step>/``:

* ``trainable.safetensors``: the trainable parameters by model name (LoRA A/B included);
  frozen weights are not copied, they come from the pretrained folder again.
* ``optimizer.safetensors``: AdamW's first and second moments.
* ``state.json``: step, optimizer step count, data-loader position, RNG states, the arguments.

A checkpoint is written to a temporary folder and renamed, so a crash never leaves a
half-written ``checkpoint-*`` behind; only the last ``keep_last`` are kept.
:func:`export_model` writes a full model folder (config.json, model.safetensors, tokenizer)
that ``models.from_pretrained`` and the captioning scripts load.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from safetensors.numpy import load_file, save_file

logger = logging.getLogger(__name__)

_PATTERN = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainingState:
    step: int
    optimizer_steps: int
    data: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)
    args: dict = field(default_factory=dict)


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _PATTERN.match(p.name)) and
             (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def _to_numpy(value: Tensor) -> np.ndarray:
    return np.ascontiguousarray(value.astype(ms.float32).asnumpy() if value.dtype == ms.bfloat16
                                else value.asnumpy())


def save_checkpoint(output_dir: str | Path, state: TrainingState, params: dict[str, Tensor],
                    optimizer_state: dict[str, np.ndarray], keep_last: int = 3) -> Path:
    """Write ``checkpoint-<step>`` atomically and delete all but the newest ``keep_last``."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{state.step:08d}"
    tmp = output_dir / f".tmp-checkpoint-{state.step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: _to_numpy(p) for n, p in params.items()}, str(tmp / "trainable.safetensors"))
    save_file({n: np.ascontiguousarray(a) for n, a in optimizer_state.items()}, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state.__dict__, indent=1, default=_json_default))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved %s", final)
    return final


def _json_default(value: Any):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in state.json")


def load_checkpoint(folder: str | Path, params: dict[str, ms.Parameter]) -> tuple[TrainingState, dict[str, np.ndarray]]:
    """Fill ``params`` (name -> Parameter) from ``folder``; returns the state and the optimizer arrays."""
    folder = Path(folder)
    weights = load_file(str(folder / "trainable.safetensors"))
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ValueError(f"{folder} does not match the trainable parameters: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (was it written with another config?)")
    for name, param in params.items():
        ops.assign(param, Tensor(weights[name]).astype(param.dtype))  # in place: compiled graphs see it
    state = TrainingState(**json.loads((folder / "state.json").read_text()))
    return state, load_file(str(folder / "optimizer.safetensors"))


def export_model(model: nn.Cell, folder: str | Path, tokenizer=None, exclude: tuple[str, ...] = ()) -> Path:
    """A complete model folder (config.json + model.safetensors [+ tokenizer]) for ``from_pretrained``.

    ``exclude``: name suffixes left out (e.g. LoRA A/B when they were merged into the weights).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: _to_numpy(p) for n, p in model.parameters_and_names() if not n.endswith(exclude)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def save_adapter(model: nn.Cell, folder: str | Path) -> Path:
    """LoRA A/B matrices alone (``lora.safetensors``), to keep next to an unchanged base checkpoint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: _to_numpy(p) for n, p in model.parameters_and_names() if n.endswith((".lora_A", ".lora_B"))}
    save_file(tensors, str(folder / "lora.safetensors"))
    return folder
