"""Tensor parallelism of Qwen3.5's hybrid decoder: Gated DeltaNet layers split by key heads with their value heads.

``tests/test_tensor_parallel.py``'s msrun run of 2 workers (tests/tp_worker.py) also loads two tiny
``Qwen3_5ForCausalLM`` with tp_size 2 (built by :func:`tp_family`): a dense 3:1 model and an MoE 2:1 one (experts split 4 + 4, a tensor-parallel shared expert). 2 key heads and 4 value heads: each
rank keeps one key head and the two value heads that read it. Both ranks' logits of a left-padded batch (one prompt
of two delta-rule chunks) must equal transformers' (each row alone) and the whole model's within 1e-4, on the same
bits on both ranks, and their greedy ids must be identical to both.

Single-process checks (no msrun): what each rank loads (three row ranges of ``in_proj_qkv`` and ``conv1d``), that
the ranks' partial DeltaNet outputs and states add up to / are slices of the whole layer's, and the one-line refusal
of key heads the group size does not divide.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.qwen3_5")

from mindspore import Tensor  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from models import parallel  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.generation import left_pad  # noqa: E402
from models.linear_attention import GatedDeltaNet  # noqa: E402
from models.qwen3_5.modeling import Qwen3_5ForCausalLM  # noqa: E402
from tests.test_tensor_parallel import _as_rank  # noqa: E402
from tests.test_qwen3_5 import DENSE, FULL, LINEAR, MOE, PAD, VOCAB, save_checkpoint  # noqa: E402

NEW_TOKENS = 8  # tests/tp_worker.py generates this many
MODELS = {
    "dense": dict(moe=False, **DENSE["interval"]),  # 3:1: three DeltaNet layers, then gated attention
    "moe": dict(moe=True, layer_types=[LINEAR, FULL, LINEAR, LINEAR], **MOE),  # 2:1 and a trailing DeltaNet
}
LENGTHS = (70, 9, 4)  # 70: two chunks of the delta rule


def _hf_rows(folder: Path, moe: bool, rows: list[list[int]]) -> dict:
    """transformers on each row alone, laid out as our left-padded batch: logits, greedy ids, the real positions."""
    model_class = transformers.Qwen3_5MoeForCausalLM if moe else transformers.Qwen3_5ForCausalLM
    hf = model_class.from_pretrained(folder).eval()
    ids, mask = left_pad(rows, PAD)
    logits = np.zeros(ids.shape + (VOCAB,), np.float32)
    greedy = np.full((len(rows), ids.shape[1] + NEW_TOKENS), PAD, np.int64)
    with torch.no_grad():
        for r, row in enumerate(rows):
            pad = ids.shape[1] - len(row)
            prompt = torch.tensor([row])
            logits[r, pad:] = hf(input_ids=prompt).logits.numpy()[0]
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                              do_sample=False, pad_token_id=PAD).numpy()[0]
            greedy[r, pad:pad + len(out)] = out
    return {"inputs": dict(input_ids=ids, attention_mask=mask), "logits": logits, "ids": greedy,
            "mask": mask.astype(bool)}


def tp_family(name: str):
    """``tests/test_tensor_parallel.py``'s family builder for ``MODELS[name]``: (folder) -> (inputs, transformers'
    reference), so these models join its one msrun run."""
    def build(folder: Path) -> tuple[dict, dict]:
        options = MODELS[name]
        save_checkpoint(folder, **options)
        rng = np.random.default_rng(5)
        reference = _hf_rows(folder, options["moe"], [rng.integers(1, VOCAB, n).tolist() for n in LENGTHS])
        return reference.pop("inputs"), reference
    return build


# ---------------------------------------------------------------- single-process checks of the split layout


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("dense"), **DENSE["interval"])


def _rank_models(folder: Path, size: int = 2) -> list[Qwen3_5ForCausalLM]:
    config = transformers.Qwen3_5TextConfig.from_pretrained(folder)
    models = []
    for rank in range(size):
        with parallel.building(_as_rank(rank, size)):
            models.append(load_checkpoint(Qwen3_5ForCausalLM(config), folder))
    return models


def test_each_rank_loads_its_key_heads_and_their_value_heads(dense_checkpoint):
    """2 key heads (dk 16), 4 value heads (dv 16): rank r keeps key head r and value heads 2r, 2r + 1."""
    full = load_file(str(dense_checkpoint / "model.safetensors"))
    prefix = "model.layers.1.linear_attn."
    for rank, model in enumerate(_rank_models(dense_checkpoint)):
        params = {name: p.asnumpy() for name, p in model.parameters_and_names()}
        keys, values = slice(16 * rank, 16 * (rank + 1)), slice(32 * rank, 32 * (rank + 1))
        heads = slice(2 * rank, 2 * (rank + 1))

        def rows(name, *parts):
            return np.concatenate([full[prefix + name][part] for part in parts])

        qkv = [keys, slice(32 + keys.start, 32 + keys.stop), slice(64 + values.start, 64 + values.stop)]
        np.testing.assert_array_equal(params[prefix + "in_proj_qkv.weight"], rows("in_proj_qkv.weight", *qkv))
        np.testing.assert_array_equal(params[prefix + "conv1d.weight"], rows("conv1d.weight", *qkv))
        np.testing.assert_array_equal(params[prefix + "in_proj_z.weight"], rows("in_proj_z.weight", values))
        for name in ("in_proj_b.weight", "in_proj_a.weight", "dt_bias", "A_log"):
            np.testing.assert_array_equal(params[prefix + name], rows(name, heads), err_msg=name)
        np.testing.assert_array_equal(params[prefix + "out_proj.weight"], full[prefix + "out_proj.weight"][:, values])
        np.testing.assert_array_equal(params[prefix + "norm.weight"], full[prefix + "norm.weight"])  # whole
        net = model.model.layers[1].linear_attn
        assert (net.num_k_heads, net.num_v_heads, net.conv_dim) == (1, 2, 64)
        cache = model.init_cache(3, 8)  # the states hold this rank's heads only
        assert cache[2].shape == (3, 64, 4) and cache[3].shape == (3, 2, 16, 16)
        assert cache[6].shape == (3, 1, 8, 16)  # the attention layer's keys: one of its 2 key/value heads


def test_ranks_partial_outputs_add_up_to_the_whole_layer(dense_checkpoint):
    """Without the all-reduce each rank's DeltaNet gives its heads' share of out_proj: the shares sum to the whole
    layer's output, and each rank's conv and recurrent states are the whole layer's for its channels and heads."""
    whole = _rank_models(dense_checkpoint, 1)[0].model.layers[0].linear_attn
    nets = [model.model.layers[0].linear_attn for model in _rank_models(dense_checkpoint)]
    x = Tensor(np.random.default_rng(0).normal(size=(2, 12, 64)).astype(np.float32))
    mask = Tensor(np.array([[0] * 3 + [1] * 9, [1] * 12], np.int32))
    out, conv, state = (t.asnumpy() for t in whole.prompt(x, mask))
    parts = [[t.asnumpy() for t in net.prompt(x, mask)] for net in nets]
    np.testing.assert_allclose(parts[0][0] + parts[1][0], out, atol=1e-5)
    for rank, (_, part_conv, part_state) in enumerate(parts):
        channels = np.r_[16 * rank:16 * (rank + 1), 32 + 16 * rank:32 + 16 * (rank + 1), 64 + 32 * rank:96 + 32 * rank]
        np.testing.assert_allclose(part_conv, conv[:, channels], atol=1e-6)
        np.testing.assert_allclose(part_state, state[:, 2 * rank:2 * rank + 2], atol=1e-5)


def test_key_heads_the_group_does_not_divide_are_refused_in_one_line(dense_checkpoint):
    config = transformers.Qwen3_5TextConfig.from_pretrained(dense_checkpoint)
    with parallel.building(_as_rank(0, 4)), pytest.raises(parallel.TensorParallelError) as error:
        GatedDeltaNet(config)
    message = str(error.value)
    assert "linear_num_key_heads (2) is not divisible by tp_size 4" in message and "\n" not in message
    with parallel.building(_as_rank(0, 4)), pytest.raises(parallel.TensorParallelError, match="linear_num_key_heads"):
        Qwen3_5ForCausalLM(config)
