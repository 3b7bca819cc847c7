"""Load Hugging Face checkpoints (safetensors, or PyTorch .bin) into MindSpore Cells by parameter name.

One loader for every model family. A folder holds ``config.json`` and either
``model.safetensors`` or shards listed in ``model.safetensors.index.json``, or, where only
those were published, PyTorch's ``pytorch_model.bin`` or its shards (read without torch,
by ``models.torch_checkpoint``). Tensors are read lazily, one at a time, with plain file
reads (bfloat16 and float8 e4m3, which numpy lacks, are widened to float32 from the raw bytes), so
peak memory stays near the model's own size; a tensor-parallel rank reads only its slices.

FP8 block-quantised checkpoints (``quantization_config.quant_method`` "fp8", as Qwen's "-FP8" releases)
store each quantised weight ``X`` in float8 e4m3 with ``X_scale_inv``: one float scale per block of
``weight_block_size`` (default 128 x 128) over the last two dimensions, or one per tensor. They are
dequantised to float32 as they are read (:func:`dequantized`), before renaming and ``checkpoint_hook``,
so models see plain float tensors.

Every parameter must be filled and every tensor consumed, otherwise
:class:`CheckpointError` names the missing, unexpected and wrongly shaped entries.
A parameter object shared by several cells (tied weights) is one parameter reachable
under each of its names; any one of them in the checkpoint fills it.

Any Cell of the model tree may declare (class or instance) attributes, with names relative to
that Cell (so a language model's declarations keep working inside a composite):

* ``checkpoint_rename_rules``: ``[(regex, replacement), ...]`` applied in order to
  checkpoint keys below the Cell (outer Cells first), mapping published layouts to ours.
* ``tied_weights_keys``: checkpoint keys that may be present but need no parameter
  of their own (e.g. ``lm_head.weight`` when the head reuses the embedding); dropped.
* ``checkpoint_slices``: ``{parameter name: (dim, start, stop, full size)}`` for a tensor-parallel
  cell (``models.parallel``) that holds only part of a tensor; only that part is read. A part made of
  several ranges of one dimension (a rank's q, k and v rows of a fused projection) is
  ``(dim, ((start, stop), ...), full size)``: they are read one by one and concatenated in that order.
* ``keep_in_fp32_modules``: module names (as in transformers: any dotted component run of
  the parameter path below the Cell, e.g. ``"qformer"`` or ``"wo"``) whose parameters stay
  float32 whatever ``dtype`` is.

The top-level model may also define ``checkpoint_hook(tensors)`` to merge or split
entries of the ``{name: TensorRef}`` dict after renaming.
"""
from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn
from safetensors import safe_open

from models.torch_checkpoint import TORCH_SUFFIXES, TorchCheckpointError, read_state_dict

logger = logging.getLogger(__name__)

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
_NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_SHOW = 10  # names listed per category in error messages
SCALE_SUFFIX = "_scale_inv"  # FP8 checkpoints: ``X_scale_inv`` holds the scales of ``X``
DEFAULT_BLOCK_SIZE = (128, 128)  # transformers' FineGrainedFP8Config default weight_block_size


def _e4m3_table() -> np.ndarray:
    """float32 value of each float8 e4m3fn byte: 4 exponent bits (bias 7), 3 mantissa bits, subnormals at
    exponent 0, no infinities, NaN where all exponent and mantissa bits are set."""
    byte = np.arange(256)
    exponent, mantissa = (byte >> 3) & 15, (byte & 7).astype(np.float64)
    magnitude = np.where(exponent == 0, mantissa * 2.0 ** -9, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    value = np.where(byte >= 128, -magnitude, magnitude).astype(np.float32)
    value[(byte & 127) == 127] = np.nan
    return value


E4M3_TABLE = _e4m3_table()
# dtypes numpy lacks: (the integer type their bytes are read as, the widening of those to float32)
_WIDENED: dict[str, tuple[type, Callable[[np.ndarray], np.ndarray]]] = {
    "BF16": (np.uint16, lambda raw: (raw.astype(np.uint32) << 16).view(np.float32)),
    "F8_E4M3": (np.uint8, lambda raw: E4M3_TABLE[raw]),
}


class CheckpointError(ValueError):
    """A model folder or its weights do not match what the model needs."""


@dataclass
class TensorRef:
    """A checkpoint tensor known by shape, read only when needed.

    ``read_part(index)`` reads only ``tensor[index]`` where the file allows it; ``index`` slices one
    dimension, ``dim``, and is ``(slice(None),) * dim + (slice(start, stop),)``. ``dtype``: the
    safetensors dtype in the file ("" where unknown), which tells FP8 tensors apart before any read.
    """

    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]
    read_part: Optional[Callable[[tuple], np.ndarray]] = None
    dtype: str = ""

    def part(self, dim: int, start: int, stop: int) -> np.ndarray:
        """Entries [start, stop) along ``dim``: a tensor-parallel rank's slice."""
        return self.take((slice(None),) * dim + (slice(start, stop),))

    def take(self, index: tuple) -> np.ndarray:
        """``tensor[index]`` (``index`` as for ``read_part``; empty: all of it)."""
        if not index:
            return self.read()
        if self.read_part is not None:
            return self.read_part(index)
        return self.read()[index]


def read_config(folder: str | Path) -> dict:
    """The parsed ``config.json`` of a model folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Model folder {folder} does not exist or is not a directory.")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"No config.json in {folder}: expected a Hugging Face model folder with config.json "
            "and model.safetensors (or model.safetensors.index.json and its shards)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore it from the published checkpoint") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(config).__name__}")
    return config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def load_tokenizer(folder: str | Path):
    """The folder's transformers tokenizer, or one CheckpointError that names the folder and the problem.

    Its chat template (code from the checkpoint) is tried on test conversations here, so a broken one fails
    the load once, and it then renders every prompt within time and size limits (``models.chat_template``).
    """
    from transformers import AutoTokenizer

    from models.chat_template import ChatTemplateError, bound_chat_templates

    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"No tokenizer in {folder}: expected one of {', '.join(TOKENIZER_FILES)} "
                              f"(with tokenizer_config.json); copy them from the published checkpoint")
    if (folder / "config.json").is_file():
        read_config(folder)  # transformers 5's AutoTokenizer reads it too: name a broken one as such
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for broken tokenizer files
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {type(exc).__name__}: {exc}") from exc
    try:
        return bound_chat_templates(tokenizer)
    except ChatTemplateError as exc:
        raise CheckpointError(f"the chat template in {folder} cannot be used: {exc}") from None


def _listed_shards(index: Path) -> list[Path]:
    try:
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index} is not a valid shard index ({exc}); restore it from the checkpoint") from exc
    absent = [n for n in names if not (index.parent / n).is_file()]
    if absent:
        raise CheckpointError(f"{index} lists shards missing from {index.parent}: {', '.join(absent)}")
    return [index.parent / n for n in names]


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a folder: safetensors (the shards of the index, or ``model.safetensors``),
    else PyTorch ``pytorch_model.bin`` or the shards of ``pytorch_model.bin.index.json``."""
    folder = Path(folder)
    for stem in ("model.safetensors", "pytorch_model.bin"):
        if (folder / f"{stem}.index.json").is_file():
            return _listed_shards(folder / f"{stem}.index.json")
        if (folder / stem).is_file():
            return [folder / stem]
    for pattern in ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin"):
        shards = sorted(folder.glob(pattern))
        if shards:
            return shards
    others = sorted(p.name for p in folder.glob("*.pt*"))
    hint = f" Found {', '.join(others)}: a training file is loaded by its own path." if others else ""
    raise CheckpointError(
        f"No weights in {folder}: expected model.safetensors or pytorch_model.bin, or their "
        f"*.index.json with its shards.{hint}"
    )


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return 8 + size, json.loads(f.read(size))


_CHUNK_BYTES = 32 * 2**20  # a column slice is read this many bytes of whole rows at a time


def _read_exactly(f, target: np.ndarray) -> None:
    view, got = memoryview(target.reshape(-1).view(np.uint8)), 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{f.name} ends inside a tensor; a download cut short? Fetch the file again")
        got += n


def _file_reader(path: Path, start: int, kind: str, shape: tuple[int, ...]) -> Callable[[tuple], np.ndarray]:
    """Reads ``tensor[index]`` (all of it, or one slice along one axis: a tensor-parallel part) with plain
    reads, not a memory map, so the file's pages never count against the process's memory; a slice
    reads only its bytes, or, across rows, whole rows a chunk at a time. bfloat16 and float8 e4m3 are
    widened to float32."""
    item = np.dtype(_WIDENED[kind][0] if kind in _WIDENED else _NUMPY_DTYPES[kind])

    def read(index: tuple = ()) -> np.ndarray:
        dim = len(index) - 1 if index else 0
        size = shape[dim] if shape else 1
        lo, hi, _ = index[-1].indices(size) if index else (0, size, 1)
        outer, inner = int(np.prod(shape[:dim])), int(np.prod(shape[dim + 1:]))
        out = np.empty((outer, hi - lo, inner), item)
        row = size * inner * item.itemsize
        with open(path, "rb") as f:
            if outer == 1 or (lo, hi) == (0, size):
                f.seek(start + lo * inner * item.itemsize)
                _read_exactly(f, out)
            else:
                rows = max(1, _CHUNK_BYTES // row)
                buffer = np.empty((rows, size, inner), item)
                for first in range(0, outer, rows):
                    n = min(rows, outer - first)
                    f.seek(start + first * row)
                    _read_exactly(f, buffer[:n])
                    out[first:first + n] = buffer[:n, lo:hi]
        out = out.reshape(shape[:dim] + (hi - lo,) + shape[dim + 1:] if shape else ())
        return _WIDENED[kind][1](out) if kind in _WIDENED else out

    return read


def _open_torch(path: Path) -> dict[str, TensorRef]:
    try:
        return {name: TensorRef(t.shape, t.read) for name, t in read_state_dict(path).items()}
    except TorchCheckpointError as exc:
        raise CheckpointError(str(exc)) from exc


def open_checkpoint(folder: str | Path) -> dict[str, TensorRef]:
    """All tensors of a folder's weight files (or of one weight file) as lazy references."""
    tensors: dict[str, TensorRef] = {}
    folder = Path(folder)
    files = [folder] if folder.is_file() else weight_files(folder)
    for path in files:
        if path.suffix in TORCH_SUFFIXES:
            for name, ref in _open_torch(path).items():
                if name in tensors:
                    raise CheckpointError(f"Tensor {name} appears in more than one file of {folder}")
                tensors[name] = ref
            continue
        try:
            with safe_open(str(path), framework="np"):  # checks the header against the file's size
                pass
            data_start, header = _header(path)
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type is not importable
            raise CheckpointError(f"{path} is damaged or incomplete ({exc}); a download cut short? "
                                  f"Fetch the file again") from exc
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in tensors:
                raise CheckpointError(f"Tensor {name} appears in more than one file of {folder}")
            shape = tuple(info["shape"])
            if info["dtype"] not in _WIDENED and info["dtype"] not in _NUMPY_DTYPES:
                raise CheckpointError(f"Tensor {name} in {path} has unsupported dtype {info['dtype']}")
            read = _file_reader(path, data_start + info["data_offsets"][0], info["dtype"], shape)
            tensors[name] = TensorRef(shape, read, read, info["dtype"])
    return tensors


def _field(owner, key: str, default=None):
    """``owner[key]`` of a dict, ``owner.key`` of a config object (transformers' or another)."""
    if isinstance(owner, dict):
        return owner.get(key, default)
    return getattr(owner, key, default)


def quantization_config(config) -> Optional[object]:
    """The ``quantization_config`` of a model config (config.json's dict or a transformers config), at its
    top level or, for a composite model, in its ``text_config``; None for an unquantised model."""
    for owner in (config, _field(config, "text_config")):
        found = _field(owner, "quantization_config") if owner is not None else None
        if found is not None:
            return found
    return None


def fp8_block_size(config) -> Optional[tuple[int, int]]:
    """The FP8 scale block of a model config: its ``weight_block_size``, 128 x 128 where none is given (as in
    transformers), None where it is null (per-tensor scales only)."""
    quantization = quantization_config(config)
    if quantization is None:
        return DEFAULT_BLOCK_SIZE
    size = _field(quantization, "weight_block_size", DEFAULT_BLOCK_SIZE)
    return None if size is None else (int(size[0]), int(size[1]))


# Plain bounds on config.json's sizes, far beyond any published model, so a damaged or hostile file is refused
# before it builds for minutes or asks for hundreds of GiB: (keys, fewest, most).
SIZE_BOUNDS = (
    (("hidden_size", "intermediate_size", "moe_intermediate_size", "out_hidden_size", "head_dim", "d_model",
      "d_ff", "d_kv", "ffn_dim", "word_embed_proj_dim", "encoder_hidden_size", "embed_dim", "projection_dim",
      "image_size", "patch_size", "linear_key_head_dim", "linear_value_head_dim"), 1, 1 << 17),
    (("shared_expert_intermediate_size",), 0, 1 << 17),
    (("linear_conv_kernel_dim",), 1, 1 << 6),
    (("num_hidden_layers", "num_layers", "num_decoder_layers", "depth"), 1, 1 << 10),
    (("num_attention_heads", "num_key_value_heads", "num_heads", "linear_num_key_heads", "linear_num_value_heads"),
     1, 1 << 10),
    (("vocab_size",), 1, 1 << 22),
    (("num_experts", "num_local_experts"), 0, 1 << 14),
    (("num_experts_per_tok",), 1, 1 << 10),
    (("max_position_embeddings", "num_position_embeddings", "n_positions"), 1, 1 << 23),
)


def _size_problem(config: dict, where: str = "") -> Optional[str]:
    """The first size of ``config`` (nested configs included) that is not a whole number within its bounds."""
    for key, value in config.items():
        name = f"{where}{key}"
        if isinstance(value, dict):
            problem = _size_problem(value, f"{name}.")
            if problem:
                return problem
            continue
        for keys, low, high in SIZE_BOUNDS:
            if key in keys and value is not None:
                if isinstance(value, bool) or not isinstance(value, int):
                    return f"{name} is {value!r}, not a whole number"
                if not low <= value <= high:
                    return f"{name} is {value}, outside {low}..{high}"
    return None


def check_config(config: dict, source: str | Path) -> None:
    """Refuse in one line, before a model is built, a config.json whose weights or sizes cannot load: sizes that
    are not whole numbers within plain bounds, a quantisation other than FP8 (weight_scale_inv), or a vision
    tower whose output width is not the decoder's."""
    problem = _size_problem(config)
    if problem:
        raise CheckpointError(f"{source}: {problem}; restore config.json from the published checkpoint")
    quantization = quantization_config(config)
    method = _field(quantization, "quant_method") if quantization is not None else None
    if quantization is not None and str(method).lower() != "fp8":
        raise CheckpointError(f"{source}: quant_method {method!r} cannot load: only FP8 block-quantised checkpoints "
                              f"(quant_method 'fp8', weight_scale_inv scales) load; use the model's bf16 release")
    vision, text = config.get("vision_config"), config.get("text_config")
    if isinstance(vision, dict) and isinstance(text, dict) and "out_hidden_size" in vision and "hidden_size" in text:
        if vision["out_hidden_size"] != text["hidden_size"]:
            raise CheckpointError(f"{source}: vision_config.out_hidden_size {vision['out_hidden_size']} is not "
                                  f"text_config.hidden_size {text['hidden_size']}: the vision tower's output must "
                                  f"be the decoder's width (a vision/decoder size mismatch)")


def _index_ranges(index: tuple, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """[start, stop) per dimension of ``tensor[index]`` (``index`` as for ``TensorRef.read_part``)."""
    ranges = [(0, n) for n in shape]
    if index:
        ranges[len(index) - 1] = index[-1].indices(shape[len(index) - 1])[:2]
    return ranges


def _scaled(name: str, values: TensorRef, scales: TensorRef, block: Optional[tuple[int, int]]) -> TensorRef:
    """``values`` times its scales as a lazy float32 tensor; a slice reads only its rows (or experts) and
    the blocks of scales that cover them."""
    shape, scale_shape = tuple(values.shape), tuple(scales.shape)
    if scale_shape in ((), (1,)):
        def read_scalar(index: tuple = ()) -> np.ndarray:
            out = values.take(index).astype(np.float32, copy=False)
            out *= scales.read().astype(np.float32).reshape(())
            return out

        return TensorRef(shape, read_scalar, read_scalar)
    if block is None:
        raise CheckpointError(f"{name}{SCALE_SUFFIX} has shape {scale_shape}, a scale per block, but config.json's "
                              f"quantization_config sets no weight_block_size")
    if len(shape) < 2:
        raise CheckpointError(f"{name} {shape} has scales of shape {scale_shape}: blocks need two dimensions")
    grid = shape[:-2] + tuple(-(-n // b) for n, b in zip(shape[-2:], block))
    if scale_shape != grid:
        raise CheckpointError(f"{name}{SCALE_SUFFIX} has shape {scale_shape}, not {grid}: the scales of {name} "
                              f"{shape} in blocks of {block[0]} x {block[1]} (quantization_config.weight_block_size)")

    def read_blocks(index: tuple = ()) -> np.ndarray:
        ranges = _index_ranges(index, shape)
        dim = len(index) - 1
        if dim >= len(shape) - 2:  # rows or columns: the blocks that hold them
            size = block[dim - len(shape) + 2]
            start, stop = ranges[dim]
            scale_index = index[:-1] + (slice(start // size, -(-stop // size)),)
        else:
            scale_index = index
        out = values.take(index).astype(np.float32, copy=False)
        factors = scales.take(scale_index).astype(np.float32, copy=False)
        (row0, row1), (col0, col1) = ranges[-2:]
        factors = factors[..., np.arange(col0, col1) // block[1] - col0 // block[1]]
        for i, first in enumerate(range(row0 - row0 % block[0], row1, block[0])):
            rows = slice(max(first, row0) - row0, min(first + block[0], row1) - row0)
            out[..., rows, :] *= factors[..., i:i + 1, :]
        return out

    return TensorRef(shape, read_blocks, read_blocks)


def dequantized(tensors: dict[str, TensorRef], block: Optional[tuple[int, int]] = DEFAULT_BLOCK_SIZE
                ) -> dict[str, TensorRef]:
    """``tensors`` with each tensor ``X`` that has a companion ``X_scale_inv`` (FP8 checkpoints: a weight
    ``P.weight`` and ``P.weight_scale_inv``) replaced by one lazy float32 tensor, ``X * scale`` per ``block``
    of its last two dimensions (or one scale for all), and the scales consumed. Reads nothing; an FP8
    tensor without scales is a :class:`CheckpointError`."""
    out: dict[str, TensorRef] = {}
    for name, ref in tensors.items():
        if name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in tensors:
            continue
        scales = tensors.get(name + SCALE_SUFFIX)
        if scales is not None:
            out[name] = _scaled(name, ref, scales, block)
        elif ref.dtype.startswith("F8"):
            raise CheckpointError(f"FP8 tensor {name} has no {name}{SCALE_SUFFIX} (its scales) in the checkpoint; "
                                  f"restore the published FP8 files")
        else:
            out[name] = ref
    return out


def _walk(cell: nn.Cell, prefix: str = "") -> Iterator[tuple[str, nn.Cell]]:
    """Every (path, cell) of the tree, a shared cell once per path (unlike ``cells_and_names``)."""
    yield prefix, cell
    for name, child in cell.name_cells().items():
        if child is not None:
            yield from _walk(child, f"{prefix}.{name}" if prefix else name)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _rename(name: str, rules: list[tuple[str, list[tuple[str, str]]]]) -> str:
    for prefix, cell_rules in rules:
        head = f"{prefix}." if prefix else ""
        if not name.startswith(head):
            continue
        rest = name[len(head):]
        for pattern, repl in cell_rules:
            rest = re.sub(pattern, repl, rest)
        name = head + rest
    return name


def _summary(kind: str, names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW]) + (", ..." if len(names) > _SHOW else "")
    return f"{len(names)} {kind}: {shown}"


def _keeps_fp32(name: str, modules: list[tuple[str, str]]) -> bool:
    for path, module in modules:
        head = f"{path}." if path else ""
        if name.startswith(head) and f".{module}." in f".{name[len(head):]}.":
            return True
    return False


def _cast(array: np.ndarray, dtype) -> Tensor:
    if not np.issubdtype(array.dtype, np.floating):
        return Tensor(np.ascontiguousarray(array))
    if dtype == ms.bfloat16:
        return Tensor(np.ascontiguousarray(array, dtype=np.float32)).astype(ms.bfloat16)
    return Tensor(np.ascontiguousarray(array, dtype=np.float16 if dtype == ms.float16 else np.float32))


def _renamed_tensors(model: nn.Cell, source: str | Path, rules: list[tuple[str, list[tuple[str, str]]]],
                     block: Optional[tuple[int, int]]) -> dict[str, TensorRef]:
    tensors: dict[str, TensorRef] = {}
    for name, ref in dequantized(open_checkpoint(source), block).items():
        new = _rename(name, rules)
        if new in tensors:
            raise CheckpointError(f"Two checkpoint tensors map to {new} in {source}")
        tensors[new] = ref
    if hasattr(model, "checkpoint_hook"):
        model.checkpoint_hook(tensors)
    return tensors


Slice = tuple[int, list[tuple[int, int]], int]  # (dim, [(start, stop), ...], full size)


def slice_ranges(spec: tuple) -> Slice:
    """A ``checkpoint_slices`` entry, ``(dim, start, stop, full)`` or ``(dim, ((start, stop), ...), full)``, as
    ``(dim, [(start, stop), ...], full)``."""
    if len(spec) == 4:
        dim, start, stop, full = spec
        return int(dim), [(int(start), int(stop))], int(full)
    dim, ranges, full = spec
    return int(dim), [(int(start), int(stop)) for start, stop in ranges], int(full)


def read_slice(ref: TensorRef, part: Slice) -> np.ndarray:
    """The entries of ``part``'s ranges along its dimension, each read alone, concatenated in their order."""
    dim, ranges, _ = part
    pieces = [ref.part(dim, start, stop) for start, stop in ranges]
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=dim)


def load_checkpoint(model: nn.Cell, folder: str | Path, dtype: str = "float32",
                    overlay: str | Path | None = None) -> nn.Cell:
    """Fill every parameter of ``model`` from the weights in ``folder``; cast floats to ``dtype``.

    ``overlay``: a weight file (e.g. a LAVIS fine-tuning ``.pth``, which holds only the
    trained parameters) whose tensors replace the folder's; every one must name a parameter.
    FP8 tensors are dequantised with the scale block of ``model.config``'s ``quantization_config``.
    Raises :class:`CheckpointError` (before any data is read) listing missing,
    unexpected and shape-mismatched names when checkpoint and model disagree.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    target = DTYPES[dtype]
    aliases: dict[int, list[str]] = {}
    params: dict[int, Parameter] = {}
    rules: list[tuple[str, list[tuple[str, str]]]] = []
    tied: set[str] = set()
    fp32_modules: list[tuple[str, str]] = []
    slices: dict[int, Slice] = {}
    for path, cell in _walk(model):
        for name, param in cell.parameters_and_names(expand=False):
            aliases.setdefault(id(param), []).append(_join(path, name))
            params[id(param)] = param
            if name in (getattr(cell, "checkpoint_slices", None) or {}):
                slices[id(param)] = slice_ranges(cell.checkpoint_slices[name])
        if getattr(cell, "checkpoint_rename_rules", None):
            rules.append((path, list(cell.checkpoint_rename_rules)))
        tied.update(_join(path, name) for name in getattr(cell, "tied_weights_keys", None) or ())
        fp32_modules += [(path, m) for m in getattr(cell, "keep_in_fp32_modules", None) or ()]

    block = fp8_block_size(getattr(model, "config", None))
    tensors = _renamed_tensors(model, folder, rules, block)
    if overlay is not None:
        replacing = _renamed_tensors(model, overlay, rules, block)
        known = {name for names in aliases.values() for name in names} | tied
        stray = sorted(set(replacing) - known)
        if stray:
            raise CheckpointError(f"{overlay} does not fit {type(model).__name__}: "
                                  f"{_summary('tensors without a parameter', stray)}")
        tensors.update(replacing)
        logger.info("%d tensors of %s replace those of %s", len(replacing), overlay, folder)

    plan: list[tuple[Parameter, str, TensorRef, Optional[Slice]]] = []
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    for key, names in aliases.items():
        param = params[key]
        present = [n for n in names if n in tensors]
        used.update(present)
        if not present:
            missing.append(names[0])
            continue
        ref = tensors[present[0]]
        expected = list(param.shape)
        if key in slices:
            dim, ranges, full = slices[key]
            if sum(stop - start for start, stop in ranges) != expected[dim]:
                raise ValueError(f"{names[0]}: checkpoint_slices {ranges} of dim {dim} do not add up to the "
                                 f"parameter's {expected[dim]} entries")
            expected[dim] = full
        if tuple(ref.shape) != tuple(expected):
            mismatched.append(f"{names[0]} (checkpoint {tuple(ref.shape)}, model {tuple(expected)})")
            continue
        plan.append((param, names[0], ref, slices.get(key)))
    unexpected = sorted(set(tensors) - used - tied)
    if missing or unexpected or mismatched:
        parts = [_summary(k, sorted(v)) for k, v in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)) if v]
        raise CheckpointError(
            f"Checkpoint in {folder} does not match {type(model).__name__}: " + "; ".join(parts)
        )

    for param, name, ref, part in plan:
        array = ref.read() if part is None else read_slice(ref, part)
        value = _cast(array, ms.float32 if _keeps_fp32(name, fp32_modules) else target)
        if value.dtype != param.dtype:
            param.set_dtype(value.dtype)
        param.set_data(value)
    logger.info("Loaded %d tensors from %s into %s (%s)", len(plan), folder, type(model).__name__, dtype)
    return model
