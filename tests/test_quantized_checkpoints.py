"""FP8 block-quantised checkpoints (Qwen's "-FP8" releases): float8 e4m3 decoding, per-block and per-tensor
scales with partial edge blocks, fused 3-D expert tensors and their slices, a tiny Qwen3-VL whose logits and
greedy ids equal transformers' on the dequantised weights; one-line refusals of what cannot load."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mindspore import Parameter, Tensor, nn  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from models import checkpoint, from_pretrained  # noqa: E402
from models.checkpoint import (  # noqa: E402
    E4M3_TABLE, CheckpointError, TensorRef, dequantized, fp8_block_size, load_checkpoint, open_checkpoint)
from tests.test_qwen2vl import ENDOFTEXT, hf_generate, hf_inputs, left_pad, spread_weights  # noqa: E402
from tests.test_qwen3_vl import (  # noqa: E402
    EOS, SMALL_GRID, image_prompt, mixed_batch, pixels, tiny_config, video_prompt)

BLOCK = (16, 16)
NOT_CONVERTED = ["lm_head", "model.visual.merger"]  # as in published FP8 configs: some modules stay unquantised


def expand(scale: torch.Tensor, block, rows: int, cols: int) -> torch.Tensor:
    """Per-block scales repeated to the weight's last two dimensions (edge blocks cropped)."""
    return scale.repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)[..., :rows, :cols]


def quantise(weight: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scale per block of the last two dimensions): ``values * scale`` is the weight."""
    *lead, rows, cols = weight.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    padded = torch.nn.functional.pad(weight.abs(), (0, grid[1] * block[1] - cols, 0, grid[0] * block[0] - rows))
    amax = padded.reshape(*lead, grid[0], block[0], grid[1], block[1]).amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    return (weight / expand(scale, block, rows, cols)).to(torch.float8_e4m3fn), scale


def dequantise(values: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    return values.float() * expand(scale.float(), block, *values.shape[-2:])


# ----------------------------------------------------------------------------- decoding and dequantising


def test_e4m3_table_equals_torch_for_every_byte():
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    assert E4M3_TABLE.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(E4M3_TABLE), np.isnan(want))
    assert np.isnan(want).sum() == 2  # 0x7F and 0xFF
    np.testing.assert_array_equal(E4M3_TABLE, want)  # NaN positions equal, all other values (and -0.0) too
    assert E4M3_TABLE[0x7E] == 448 and E4M3_TABLE[1] == 2.0 ** -9 and np.signbit(E4M3_TABLE[0x80])


def test_fused_experts_dequantise_whole_and_by_slices(tmp_path):
    """(E, a, b) experts with (E, ceil(a/8), ceil(b/8)) bf16 scales, partial edge blocks: the whole tensor and
    slices along experts, rows and columns equal torch's dequantisation; the scales are consumed."""
    name = "model.layers.0.mlp.experts.gate_up_proj"
    gen = torch.Generator().manual_seed(0)
    values, scale = quantise(torch.randn(4, 20, 13, generator=gen), (8, 8))
    scale = scale.bfloat16()
    save_file({name: values, name + "_scale_inv": scale, "norm.weight": torch.ones(3)},
              str(tmp_path / "model.safetensors"))
    refs = dequantized(open_checkpoint(tmp_path), (8, 8))
    assert sorted(refs) == ["model.layers.0.mlp.experts.gate_up_proj", "norm.weight"]
    want = dequantise(values, scale, (8, 8)).numpy()
    got = refs[name].read()
    assert got.dtype == np.float32 and refs[name].shape == (4, 20, 13)
    np.testing.assert_array_equal(got, want)
    for dim, start, stop in [(0, 1, 3), (1, 5, 17), (1, 16, 20), (2, 3, 10), (2, 12, 13)]:
        index = (slice(None),) * dim + (slice(start, stop),)
        np.testing.assert_array_equal(refs[name].part(dim, start, stop), want[index], err_msg=str((dim, start, stop)))


def test_slices_read_only_their_rows_and_scale_blocks():
    """An expert-parallel rank reads only its experts; a row slice only the scale rows of its blocks."""
    asked: dict[str, list] = {"values": [], "scales": []}

    def ref(kind: str, array: np.ndarray, dtype: str) -> TensorRef:
        def read_part(index=()):
            asked[kind].append(index)
            return array[index].copy()

        return TensorRef(array.shape, lambda: read_part(), read_part, dtype)

    values = np.arange(3 * 10 * 6, dtype=np.float32).reshape(3, 10, 6)
    scales = np.arange(1, 1 + 3 * 3 * 2, dtype=np.float32).reshape(3, 3, 2)
    refs = dequantized({"e.down_proj": ref("values", values, "F32"),
                        "e.down_proj_scale_inv": ref("scales", scales, "F32")}, (4, 4))
    want = values * np.repeat(np.repeat(scales, 4, 1), 4, 2)[:, :10, :6]
    np.testing.assert_array_equal(refs["e.down_proj"].part(0, 2, 3), want[2:3])
    assert asked == {"values": [(slice(2, 3),)], "scales": [(slice(2, 3),)]}
    np.testing.assert_array_equal(refs["e.down_proj"].part(1, 5, 9), want[:, 5:9])
    assert asked["values"][-1] == (slice(None), slice(5, 9)) and asked["scales"][-1] == (slice(None), slice(1, 3))


def test_per_tensor_scale_and_block_size_from_configs():
    """A scalar scale (shape () or (1,)) scales the whole tensor, also without weight_block_size; the block
    comes from quantization_config at the top level or in text_config, a dict or an object."""
    values = np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)
    for scale in (np.array(0.25, np.float32), np.array([0.25], np.float32)):
        refs = dequantized({"w": TensorRef(values.shape, values.copy, None, "F8_E4M3"),
                            "w_scale_inv": TensorRef(scale.shape, lambda s=scale: s)}, None)
        np.testing.assert_array_equal(refs["w"].read(), values / 4)
        np.testing.assert_array_equal(refs["w"].part(1, 1, 2), values[:, 1:] / 4)
    with pytest.raises(CheckpointError, match="no weight_block_size"):
        dequantized({"w": TensorRef((2, 2), values.copy), "w_scale_inv": TensorRef((1, 1), lambda: values)}, None)
    with pytest.raises(CheckpointError, match=r"w_scale_inv has shape \(2, 2\), not \(1, 1\)"):
        dequantized({"w": TensorRef((2, 2), values.copy), "w_scale_inv": TensorRef((2, 2), lambda: values)})

    fp8 = {"quant_method": "fp8", "weight_block_size": [64, 32]}
    assert fp8_block_size(None) == fp8_block_size({}) == (128, 128)
    assert fp8_block_size({"quantization_config": fp8}) == (64, 32)
    assert fp8_block_size(SimpleNamespace(text_config=SimpleNamespace(quantization_config=fp8))) == (64, 32)
    assert fp8_block_size(SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=(8, 4)))) == (8, 4)
    assert fp8_block_size({"quantization_config": {"quant_method": "fp8"}}) == (128, 128)  # transformers' default
    assert fp8_block_size({"quantization_config": {"quant_method": "fp8", "weight_block_size": None}}) is None


def expert_model(config: dict, count: int, shape: tuple[int, int], part=None) -> nn.Cell:
    """A cell tree holding one (count, *shape) parameter at ``mlp.experts.gate_up_proj``; ``part``: the
    (dim, start, stop, full size) slice an expert-parallel rank holds."""
    experts = nn.Cell()
    experts.gate_up_proj = Parameter(Tensor(np.zeros((count, *shape), np.float32)), name="gate_up_proj")
    if part is not None:
        experts.checkpoint_slices = {"gate_up_proj": part}
    mlp, model = nn.Cell(), nn.Cell()
    mlp.experts = experts
    model.mlp = mlp
    model.config = config
    return model


def test_load_checkpoint_fills_fused_experts_whole_and_an_experts_slice(tmp_path):
    gen = torch.Generator().manual_seed(1)
    values, scale = quantise(torch.randn(4, 12, 7, generator=gen), (8, 4))
    save_file({"mlp.experts.gate_up_proj": values, "mlp.experts.gate_up_proj_scale_inv": scale},
              str(tmp_path / "model.safetensors"))
    want = dequantise(values, scale, (8, 4)).numpy()
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [8, 4]}}
    whole = load_checkpoint(expert_model(config, 4, (12, 7)), tmp_path)
    np.testing.assert_array_equal(whole.mlp.experts.gate_up_proj.asnumpy(), want)
    rank = load_checkpoint(expert_model(config, 2, (12, 7), part=(0, 2, 4, 4)), tmp_path)
    np.testing.assert_array_equal(rank.mlp.experts.gate_up_proj.asnumpy(), want[2:4])
    with pytest.raises(CheckpointError, match=r"not \(4, 1, 1\)"):  # the default 128 x 128 blocks do not fit
        load_checkpoint(expert_model({}, 4, (12, 7)), tmp_path)


# ----------------------------------------------------------------------------- a tiny Qwen3-VL in FP8


def hf_tiny(seed: int = 0):
    """tests.test_qwen3_vl's tiny model with MLP widths that are no multiple of 16: partial edge blocks."""
    config = tiny_config()
    config.text_config.intermediate_size, config.vision_config.intermediate_size = 72, 40
    torch.manual_seed(seed)
    return spread_weights(transformers.Qwen3VLForConditionalGeneration(config).eval(), seed)


def quantised_names(model) -> list[str]:
    """The linear weights an FP8 release stores in e4m3: the decoder's and vision tower's, but not
    lm_head and the modules of NOT_CONVERTED."""
    return [f"{path}.weight" for path, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not any(path == m or path.startswith(m + ".")
                                                                  for m in NOT_CONVERTED)]


def write_fp8_copy(source: Path, folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """``source``'s weights with ``names`` in e4m3 and their ``weight_scale_inv`` (bf16 for the vision tower,
    float32 for the decoder), and FP8's quantization_config; returns the dequantised weights."""
    tensors = load_file(str(source / "model.safetensors"))
    dequantised = {}
    for name in names:
        values, scale = quantise(tensors[name], BLOCK)
        if ".visual." in name:
            scale = scale.bfloat16()
        tensors[name], tensors[name + "_scale_inv"] = values, scale
        dequantised[name] = dequantise(values, scale, BLOCK)
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK), "modules_to_not_convert": NOT_CONVERTED}
    (folder / "config.json").write_text(json.dumps(config))
    return dequantised


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    """(transformers on the dequantised weights, ours loaded from the FP8 folder, the FP8 folder, the
    transformers model on the original weights)."""
    root = tmp_path_factory.mktemp("qwen3_vl_fp8")
    hf = hf_tiny()
    hf.save_pretrained(root / "bf16")
    names = quantised_names(hf)
    dequantised = write_fp8_copy(root / "bf16", root / "fp8", names)
    original = hf_tiny()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name in dequantised:
                param.copy_(dequantised[name])
    return hf, from_pretrained(root / "fp8"), root / "fp8", original


def test_fp8_folder_holds_e4m3_weights_with_partial_blocks(fp8_pair):
    _, _, folder, _ = fp8_pair
    tensors = load_file(str(folder / "model.safetensors"))
    q = "model.language_model.layers.0.mlp.gate_proj.weight"
    assert tensors[q].dtype == torch.float8_e4m3fn and tensors[q].shape == (72, 64)
    assert tensors[q + "_scale_inv"].shape == (5, 4)  # 72 rows: four blocks of 16 and one of 8
    assert tensors["model.visual.blocks.0.mlp.linear_fc2.weight_scale_inv"].shape == (2, 3)  # 32 x 40
    assert tensors["model.visual.blocks.0.mlp.linear_fc2.weight_scale_inv"].dtype == torch.bfloat16
    assert tensors["model.visual.merger.linear_fc1.weight"].dtype == torch.float32  # modules_to_not_convert
    assert tensors["lm_head.weight"].dtype == torch.float32


def test_fp8_logits_and_greedy_ids_equal_transformers_on_dequantised_weights(fp8_pair):
    hf, ours, _, original = fp8_pair
    ids, mask, vision = mixed_batch()
    ours.visual.use_jit = False
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, mask, **vision)).logits.numpy()
        unquantised = original(**hf_inputs(ids, mask, **vision)).logits.numpy()
    got = ours(input_ids=ids, attention_mask=mask, **vision).logits.asnumpy()
    ours.visual.use_jit = True
    assert np.abs(unquantised - ref)[mask == 1].max() > 1e-3  # the e4m3 rounding shows in the logits
    assert np.abs(got - ref)[mask == 1].max() < 1e-4, np.abs(got - ref)[mask == 1].max()

    single, _ = left_pad([image_prompt([22]) + video_prompt(1, SMALL_GRID, [24])])
    extra = dict(pixel_values=pixels(1, (1, 4, 6)), image_grid_thw=np.array([[1, 4, 6]]),
                 pixel_values_videos=pixels(2, (1, *SMALL_GRID)), video_grid_thw=np.array([[1, *SMALL_GRID]]))
    kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=ENDOFTEXT)
    want = hf_generate(hf, single, np.ones_like(single), **extra, **kw)
    got_ids = ours.generate(single, np.ones_like(single), **extra, **kw)
    assert want.shape[1] > single.shape[1]
    np.testing.assert_array_equal(got_ids[:, :want.shape[1]], want)
    assert (got_ids[:, want.shape[1]:] == ENDOFTEXT).all()


# ----------------------------------------------------------------------------- refusals


def config_folder(folder: Path, **changes) -> Path:
    """A folder with only a tiny Qwen3-VL config.json (no weights), ``changes`` applied to its dict."""
    config = tiny_config().to_dict()
    for key, value in changes.items():
        *path, last = key.split("__")
        owner = config
        for part in path:
            owner = owner[part]
        owner[last] = value
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def refusal(folder: Path) -> str:
    """from_pretrained's one-line CheckpointError, raised before a model is built."""
    built = mock.patch("models.qwen3_vl.modeling.Qwen3VLForConditionalGeneration",
                       side_effect=AssertionError("a model was built"))
    with built, pytest.raises(CheckpointError) as error:
        from_pretrained(folder)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_other_quantisations_are_refused_in_one_line(tmp_path):
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    message = refusal(config_folder(tmp_path / "top", quantization_config=gptq))
    assert "'gptq'" in message and "FP8" in message and "bf16" in message
    awq = config_folder(tmp_path / "text", text_config__quantization_config={"quant_method": "awq"})
    assert "'awq'" in refusal(awq)


def test_vision_output_width_other_than_decoder_width_is_refused(tmp_path):
    message = refusal(config_folder(tmp_path / "m", vision_config__out_hidden_size=48))
    assert "48" in message and "64" in message and "out_hidden_size" in message


def test_fp8_weight_without_scales_is_refused_before_reading(fp8_pair, tmp_path):
    _, _, folder, _ = fp8_pair
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.language_model.layers.1.self_attn.o_proj.weight"
    del tensors[name + "_scale_inv"]
    (tmp_path / "broken").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "broken" / "config.json")
    save_file(tensors, str(tmp_path / "broken" / "model.safetensors"))
    with mock.patch.object(checkpoint, "_read_exactly", side_effect=AssertionError("a tensor was read")), \
            pytest.raises(CheckpointError, match=name.replace(".", r"\.") + " has no") as error:
        from_pretrained(tmp_path / "broken")
    assert "\n" not in str(error.value)
