"""Qwen3.5's hybrid text decoder (models.qwen3_5) against transformers 5.25 (PyTorch, fp32, tiny random weights):
logits, greedy and beam ids of left-padded batches (each row equal to transformers on that prompt alone), for the
3:1 and 2:1 layer patterns, two partial rotary widths and the MoE variant with its shared expert; loading from
``save_pretrained``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.qwen3_5")

from safetensors.numpy import load_file, save_file  # noqa: E402

from models import from_pretrained, jit  # noqa: E402
from models.checkpoint import CheckpointError  # noqa: E402
from models.generation import left_pad  # noqa: E402
from models.qwen3_5.modeling import Qwen3_5ForCausalLM  # noqa: E402

VOCAB, PAD, NEW_TOKENS = 300, 0, 20
LINEAR, FULL = "linear_attention", "full_attention"
SIZES = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
             linear_value_head_dim=16, linear_conv_kernel_dim=4, pad_token_id=PAD)
# 3:1 (every 4th layer full attention) with the default partial rotary (a quarter of each head rotates);
# 2:1 given as layer_types, half of each head rotating
DENSE = {
    "interval": dict(full_attention_interval=4, intermediate_size=96),
    "pattern": dict(layer_types=[LINEAR, LINEAR, FULL, LINEAR], intermediate_size=96,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
}
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=32)


def spread_weights(model, seed: int):
    """Random weights around the initialisation's centre (zero for the 1 + weight norms, one for the DeltaNet's
    gated norm), so every parameter changes the outputs. Noise std 0.1 (0.8 / sqrt(hidden) for matrices): with
    larger weights the tiny network amplifies float32 rounding until transformers' own logits are 1e-4 from
    its float64 ones."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if name.endswith("linear_attn.norm.weight") else 0.0
            p.copy_(centre + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def save_checkpoint(folder: Path, moe: bool = False, **options) -> Path:
    config_class = transformers.Qwen3_5MoeTextConfig if moe else transformers.Qwen3_5TextConfig
    model_class = transformers.Qwen3_5MoeForCausalLM if moe else transformers.Qwen3_5ForCausalLM
    torch.manual_seed(0)
    spread_weights(model_class(config_class(**SIZES, **options)).eval(), 0).save_pretrained(folder)
    return folder


def load_pair(folder: Path, moe: bool = False):
    model_class = transformers.Qwen3_5MoeForCausalLM if moe else transformers.Qwen3_5ForCausalLM
    ours = from_pretrained(folder)
    assert isinstance(ours, Qwen3_5ForCausalLM)
    return model_class.from_pretrained(folder).eval(), ours


def rewrite(checkpoint: Path, folder: Path, change) -> Path:
    """A copy of ``checkpoint`` whose tensors ``change`` edits in place."""
    (folder / "config.json").write_text((checkpoint / "config.json").read_text())
    tensors = load_file(str(checkpoint / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module", params=sorted(DENSE))
def dense(request, tmp_path_factory):
    return load_pair(save_checkpoint(tmp_path_factory.mktemp(request.param), **DENSE[request.param]))


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("moe"), moe=True, **MOE)


@pytest.fixture(scope="module")
def moe(moe_checkpoint):
    return load_pair(moe_checkpoint, moe=True)


def prompts(seed: int, lengths=(5, 11, 8)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, n).tolist() for n in lengths]


def assert_logits_match(hf, ours, length: int) -> None:
    ids = np.random.default_rng(length).integers(1, VOCAB, (2, length))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    got = ours(input_ids=ids).logits.asnumpy()
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()


def hf_generate(hf, prompt: list[int], **kw):
    with torch.no_grad():
        return hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           do_sample=False, pad_token_id=PAD, return_dict_in_generate=True, output_scores=True,
                           **kw)


def early_token(hf, prompt: list[int]) -> int:
    """A token greedy decoding of ``prompt`` produces after a few steps: as eos, its row ends before the others."""
    return int(hf_generate(hf, prompt, max_new_tokens=5).sequences[0, -1])


def assert_rows_match(hf, ours, rows: list[list[int]], num_beams: int = 1, **kw) -> np.ndarray:
    """``ours`` on the left-padded batch of ``rows`` equals transformers on each row alone (all beams returned);
    finished rows are padded. Returns our new tokens."""
    ids, mask = left_pad(rows, PAD)
    kw = dict(max_new_tokens=NEW_TOKENS, num_beams=num_beams, num_return_sequences=num_beams, **kw)
    got = ours.generate(input_ids=ids, attention_mask=mask, pad_token_id=PAD, **kw)
    for r, row in enumerate(rows):
        ref = hf_generate(hf, row, **kw)
        mine = got.sequences[num_beams * r:num_beams * (r + 1), ids.shape[1] - len(row):]
        want = ref.sequences.numpy()
        np.testing.assert_array_equal(mine[:, :want.shape[1]], want, err_msg=f"row {r}")
        assert (mine[:, want.shape[1]:] == PAD).all()
        if num_beams > 1:
            np.testing.assert_allclose(got.sequences_scores[num_beams * r:num_beams * (r + 1)],
                                       ref.sequences_scores.numpy(), atol=1e-4)
    return got.sequences[:, ids.shape[1]:]


def test_layers_follow_the_config(dense):
    _, ours = dense
    config = ours.config
    for kind, layer in zip(config.layer_types, ours.model.layers):
        assert (layer.linear_attn is not None) == (kind == LINEAR)
        assert (layer.self_attn is not None) == (kind == FULL)
    rotary = int(config.head_dim * config.rope_parameters["partial_rotary_factor"])
    assert ours.model.inv_freq.shape == (rotary // 2,)
    assert ours.compile_prompt


@pytest.mark.parametrize("length", [12, 70])  # 70: two chunks of the delta rule
def test_logits_match_transformers(dense, length):
    assert_logits_match(*dense, length)


# each generation test compiles a prompt and a step graph: greedy on the 3:1 pattern, beams on the 2:1 one
@pytest.mark.parametrize("dense", ["interval"], indirect=True)
def test_greedy_left_padded_batch_equals_rows_alone(dense):
    """The prompt and the one-token steps compile once each (static shapes: states, bucketed cache)."""
    hf, ours = dense
    rows = prompts(1)
    eos = early_token(hf, rows[0])
    graphs = jit.COMPILES.graphs
    new = assert_rows_match(hf, ours, rows, eos_token_id=eos)
    assert jit.COMPILES.graphs - graphs <= 2
    assert eos in new[0, :-1].tolist(), "row 0 should end early, then be padded"
    assert len({tuple(r) for r in new.tolist()}) == len(rows)


@pytest.mark.parametrize("dense", ["pattern"], indirect=True)
def test_beam_search_equals_rows_alone(dense):
    hf, ours = dense
    rows = prompts(2, lengths=(9, 4))
    assert_rows_match(hf, ours, rows, num_beams=3, eos_token_id=early_token(hf, rows[1]), length_penalty=0.8)


def test_moe_has_experts_and_a_shared_expert_in_every_layer(moe):
    _, ours = moe
    for layer in ours.model.layers:
        mlp = layer.mlp
        assert type(mlp).__name__ == "SparseMoeBlock" and mlp.shared_expert is not None
        assert mlp.experts.gate_up_proj.shape == (8, 64, 48)
        assert mlp.shared_expert.gate_proj.weight.shape == (32, 64) and mlp.shared_expert_gate.weight.shape == (1, 64)
    assert not ours.compile_prompt


def test_moe_logits_and_greedy_match_transformers(moe):
    hf, ours = moe
    assert_logits_match(hf, ours, 12)
    rows = prompts(3)
    assert_rows_match(hf, ours, rows, eos_token_id=early_token(hf, rows[0]))


def test_missing_tensor_is_named(moe_checkpoint, tmp_path):
    def drop(tensors: dict) -> None:
        del tensors["model.layers.1.linear_attn.A_log"], tensors["model.layers.3.mlp.shared_expert_gate.weight"]

    with pytest.raises(CheckpointError, match=r"2 missing: model\.layers\.1\.linear_attn\.A_log, "
                                              r"model\.layers\.3\.mlp\.shared_expert_gate\.weight$"):
        from_pretrained(rewrite(moe_checkpoint, tmp_path, drop))


def test_multi_token_prediction_head_is_ignored(moe, moe_checkpoint, tmp_path):
    """Qwen's published Qwen3.5 weights carry an ``mtp.*`` head that decoding does not use (nor transformers)."""
    def add_head(tensors: dict) -> None:
        tensors["mtp.fc.weight"] = np.ones((64, 128), np.float32)
        tensors["mtp.layers.0.input_layernorm.weight"] = np.ones(64, np.float32)

    _, ours = moe
    loaded = from_pretrained(rewrite(moe_checkpoint, tmp_path, add_head))
    for (name, want), (_, got) in zip(ours.parameters_and_names(), loaded.parameters_and_names()):
        np.testing.assert_array_equal(got.asnumpy(), want.asnumpy(), err_msg=name)


def test_bad_layer_types_are_refused(moe_checkpoint, tmp_path):
    """(Tensor parallelism, and its refusal of key heads tp_size does not divide: tests.test_qwen3_5_parallel.)"""
    config = json.loads((moe_checkpoint / "config.json").read_text())
    config["layer_types"] = [LINEAR, "sliding_attention", LINEAR, FULL]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(moe_checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match="sliding_attention"):
        from_pretrained(tmp_path)
