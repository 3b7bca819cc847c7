"""config.json sanity (models.checkpoint.check_config, models.from_pretrained): sizes out of plain bounds, zero
heads, an unknown rope_type and experts that do not divide over the ranks are refused in one line, quickly,
before any weight is read or a large model is built."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from models import from_pretrained, parallel  # noqa: E402
from models.checkpoint import CheckpointError  # noqa: E402
from tests.test_qwen3_vl_moe import hf_moe  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen3_vl_moe")
    hf_moe().save_pretrained(folder)
    return folder


def _with(checkpoint: Path, folder: Path, change) -> Path:
    folder.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(checkpoint / "model.safetensors")
    return folder


def _set(path: str, value):
    def change(config: dict) -> None:
        *outer, last = path.split(".")
        for key in outer:
            config = config[key]
        config[last] = value
    return change


@pytest.mark.parametrize("path, value, named", [
    ("text_config.hidden_size", 1e9, r"text_config\.hidden_size is 1000000000\.0, not a whole number"),
    ("text_config.hidden_size", 1 << 30, r"text_config\.hidden_size is 1073741824, outside 1\.\.131072"),
    ("text_config.num_attention_heads", 0, r"text_config\.num_attention_heads is 0, outside 1\.\.1024"),
    ("text_config.num_hidden_layers", 10 ** 6, r"text_config\.num_hidden_layers is 1000000, outside 1\.\.1024"),
    ("vision_config.depth", "3", r"vision_config\.depth is '3', not a whole number"),
    ("text_config.rope_parameters", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                     "mrope_section": [6, 3, 3], "original_max_position_embeddings": 512},
     r"rope_type 'yarn' is not supported"),
], ids=["float", "huge", "zero-heads", "million-layers", "text", "unknown-rope"])
def test_bad_sizes_are_refused_in_one_line_before_building(checkpoint, tmp_path, path, value, named):
    folder = _with(checkpoint, tmp_path / "bad", _set(path, value))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=named) as error:
        from_pretrained(folder)
    assert time.perf_counter() - start < 10
    assert "\n" not in str(error.value) and str(folder / "config.json") in str(error.value)


class _NoComm(parallel.Communicator):
    def reducer(self):
        return None

    def gatherer(self):
        return None


def test_experts_that_do_not_divide_over_the_ranks_are_named(checkpoint, tmp_path, monkeypatch):
    """6 experts over a group of 4 (whose heads and MLP split evenly): one line naming both numbers."""
    folder = _with(checkpoint, tmp_path / "six", _set("text_config.num_local_experts", 6))
    group = parallel.TensorParallelGroup(size=4, rank=0, comm=_NoComm())
    monkeypatch.setattr(parallel, "init_group", lambda tp_size: group)
    with pytest.raises(CheckpointError, match=r"num_experts \(6\) is not divisible by tp_size 4") as error:
        from_pretrained(folder, tp_size=4)
    assert "\n" not in str(error.value)
