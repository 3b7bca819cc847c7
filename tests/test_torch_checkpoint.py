"""PyTorch .bin/.pth/.pt checkpoints read without torch: equal to torch.load, refusing code, lazily."""
from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import pickle
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models import from_pretrained
from models.checkpoint import CheckpointError, open_checkpoint
from models.convert import main as convert_main
from models.torch_checkpoint import TorchCheckpointError, read_state_dict
from pipeline.captioning.caption_blip2 import main as blip2_main
from tests.tiny_models import OPT, save_tiny_blip2
from tests.video_factory import write_caption_clips


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _state_dict() -> collections.OrderedDict:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=gen)
    shared = torch.arange(40, dtype=torch.int64)
    return collections.OrderedDict(
        fp32=base,
        view_offset=base[2:5, 1:7],  # shares base's storage, starts inside it
        transposed=base.t(),  # strides (1, 8)
        stepped=base[:, ::3],
        fp16=torch.randn(3, 5, generator=gen).half(),
        bf16=torch.randn(4, 4, generator=gen).bfloat16(),
        int64=shared[5:15].view(2, 5),
        int64_again=shared,
        flags=torch.tensor([True, False, True]),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 4),
        param=torch.nn.Parameter(torch.randn(2, 3, generator=gen)),
        position_ids=torch.arange(8).expand(1, -1),  # stride (0, 1), as transformers registers it
        broadcast=torch.arange(4.0).expand(3, 4),  # more elements than its storage holds
        windows=torch.arange(10.0).as_strided((4, 4), (2, 1)),  # overlapping rows
    )


def test_reader_equals_torch_load_on_every_tensor(tmp_path):
    path = tmp_path / "weights.bin"
    torch.save(_state_dict(), path)
    expected = torch.load(path, weights_only=True)
    got = read_state_dict(path)
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        array = got[name].read()
        assert array.shape == tuple(tensor.shape), name
        assert array.dtype == _as_numpy(tensor.detach()).dtype, name
        np.testing.assert_array_equal(array, _as_numpy(tensor.detach()), err_msg=name)
    # Views of one storage share it: one memory map, read only when asked.
    assert got["view_offset"].storage is got["fp32"].storage and got["int64"].storage is got["int64_again"].storage


def test_training_file_uses_its_model_entry(tmp_path):
    path = tmp_path / "finetune.pth"
    model = _state_dict()
    optimizer = {"state": {0: {"exp_avg": torch.ones(3), "step": 7}}, "param_groups": [{"lr": 1e-4}]}
    torch.save({"model": model, "optimizer": optimizer, "config": {"run": {"seed": 42, "amp": True, "x": None}},
                "scaler": {"scale": 65536.0}, "epoch": 3}, path)
    got = read_state_dict(path)
    assert list(got) == list(model)
    np.testing.assert_array_equal(got["bf16"].read(), model["bf16"].float().numpy())


def test_pickles_naming_other_globals_are_refused_and_never_run(tmp_path):
    path = tmp_path / "extra.pth"
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(TorchCheckpointError, match="argparse.Namespace"):
        read_state_dict(path)

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.bin"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"w": Payload()}, protocol=2))
    with pytest.raises(TorchCheckpointError, match="io.open|builtins.open"):
        read_state_dict(evil)
    assert not marker.exists()


def test_damaged_and_legacy_files_are_named(tmp_path):
    good = tmp_path / "good.bin"
    torch.save({"w": torch.ones(1000)}, good)
    cut = tmp_path / "cut.bin"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(TorchCheckpointError, match="cut.bin"):
        read_state_dict(cut)
    legacy = tmp_path / "legacy.pt"
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer, _use_new_zipfile_serialization=False)
    legacy.write_bytes(buffer.getvalue())
    with pytest.raises(TorchCheckpointError, match="legacy"):
        read_state_dict(legacy)


def _crafted(path: Path, offset, size, stride) -> Path:
    """A torch.save archive of one tensor "w" over a storage of 16 float32s, with the layout given."""
    storage = object()

    class Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (storage, offset, size, stride, False, collections.OrderedDict())

    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.persistent_id = lambda obj: ("storage", torch.FloatStorage, "0", "cpu", 16) if obj is storage else None
    pickler.dump({"w": Tensor()})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("crafted/data.pkl", buffer.getvalue())
        archive.writestr("crafted/byteorder", "little")
        archive.writestr("crafted/version", "3\n")
        archive.writestr("crafted/data/0", np.arange(16, dtype=np.float32).tobytes())
    return path


@pytest.mark.parametrize("offset, size, stride", [(1, (3, 2), (5, 2)), (0, (1, 4), (1 << 62, 1)), (2, (4, 1), (3, 1 << 62))],
                         ids=["strided", "huge-stride-on-a-length-1-dim", "huge-last-stride-on-a-length-1-dim"])
def test_crafted_layout_reads_like_torch(tmp_path, offset, size, stride):
    """A length-1 dimension's stride is never used (torch saves whatever the view had), however large."""
    path = _crafted(tmp_path / "crafted.bin", offset, size, stride)
    np.testing.assert_array_equal(read_state_dict(path)["w"].read(), torch.load(path, weights_only=True)["w"].numpy())


@pytest.mark.parametrize("offset, size, stride, problem", [
    (0, (4,), (-1,), "negative"),  # would read the three elements before the storage
    (0, (-1,), (1,), "negative"),
    (10, (4,), (2,), "reaches element 16, past its storage of 16 elements"),
    (0, (10**10,), (0,), "repeats its storage of 16 elements to 10000000000"),  # 37 GiB once read
    (0, (4,), (1, 1), "malformed"),
    (0, ("4",), (1,), "malformed"),
    (0, (0, 1 << 70), (1, 1), "implausible"),  # an empty tensor numpy cannot even describe
    (0, (1 << 30, 1 << 30, 0), (1, 1, 1), "implausible"),
], ids=["negative-stride", "negative-size", "past-the-end", "stride-0-expansion", "rank-mismatch", "not-an-int",
        "huge-empty", "huge-empty-product"])
def test_hostile_layouts_are_refused_before_any_read(tmp_path, offset, size, stride, problem):
    path = _crafted(tmp_path / "crafted.bin", offset, size, stride)
    with pytest.raises(TorchCheckpointError, match=rf"crafted\.bin: tensor 'w' .*{problem}") as error:
        read_state_dict(path)
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="tensor 'w'"):  # the loader's path (from_pretrained, --weights)
        open_checkpoint(path)


@pytest.mark.parametrize("offset, size, stride, problem", [
    (15, (2,), (-(1 << 40),), "negative"),  # segfaulted the reader
    (0, (10**10,), (0,), "repeats"),  # made convert allocate 37 GiB
], ids=["far-negative-stride", "stride-0-expansion"])
def test_convert_refuses_hostile_layouts_in_one_line(tmp_path, offset, size, stride, problem):
    path = _crafted(tmp_path / "crafted.bin", offset, size, stride)

    def limit_memory():  # a 37 GiB allocation fails here instead of reaching the machine
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    done = subprocess.run([sys.executable, "-m", "models.convert", str(path)], capture_output=True, text=True,
                          timeout=60, preexec_fn=limit_memory, cwd=Path(__file__).parents[1])
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert done.stderr.startswith(f"error: {path}: tensor 'w' ") and problem in done.stderr
    assert done.stderr.count("\n") == 1 and not done.stdout
    assert list(tmp_path.iterdir()) == [path]


@pytest.fixture(scope="module")
def bin_model(tmp_path_factory) -> tuple[Path, Path]:
    """The same tiny BLIP-2 saved as safetensors and, as kpyu/video-blip-* publishes, as .bin shards only."""
    reference = save_tiny_blip2(tmp_path_factory.mktemp("blip2_safetensors"), OPT)
    shards = tmp_path_factory.mktemp("blip2_bin")
    from transformers import Blip2ForConditionalGeneration

    # transformers 5 saves only safetensors, so the shards are written as transformers 4 wrote them with
    # safe_serialization=False: torch.save of parts of the state dict, and an index naming each tensor's file.
    state = Blip2ForConditionalGeneration.from_pretrained(reference).state_dict()
    names = list(state)
    parts = [names[i::3] for i in range(3)]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        file = f"pytorch_model-{i:05d}-of-{len(parts):05d}.bin"
        torch.save({name: state[name] for name in part}, shards / file)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (shards / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    for path in reference.glob("*.json"):  # config, generation config, tokenizer
        (shards / path.name).write_bytes(path.read_bytes())
    assert not list(shards.glob("*.safetensors"))
    return reference, shards


def test_sharded_bin_folder_loads_like_safetensors(bin_model):
    reference, shards = bin_model
    ours = {name: ref.read() for name, ref in open_checkpoint(shards).items()}
    theirs = {name: ref.read() for name, ref in open_checkpoint(reference).items()}
    # torch.save keeps the tied head (a view of the embedding); safetensors drops it.
    assert set(ours) - set(theirs) == {"language_model.lm_head.weight"} and set(theirs) <= set(ours)
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    from_pretrained(shards)  # every parameter filled, nothing left over


def test_bin_only_folder_captions_like_safetensors(bin_model, tmp_path):
    reference, shards = bin_model
    (tmp_path / "videos").mkdir()
    videos = write_caption_clips(tmp_path / "videos")
    texts = []
    for folder in (reference, shards):
        out = tmp_path / f"{folder.name}.csv"
        blip2_main([str(videos), "--pretrained_model_name_or_path", str(folder), "--output", str(out),
                    "--num_frames", "2", "--max_new_tokens", "5", "--num_beams", "2", "--min_new_tokens", "1"])
        with open(out, newline="") as f:
            texts.append([r["text"] for r in csv.DictReader(f)])
    assert texts[0] == texts[1] and any(texts[0])


def test_convert_writes_safetensors_that_torch_reads_back(bin_model, tmp_path):
    _, shards = bin_model
    folder = tmp_path / "model"
    folder.mkdir()
    for path in shards.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    written = convert_main([str(folder)])
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in written if p.suffix == ".safetensors"}
    for source in sorted(folder.glob("pytorch_model-*.bin")):
        target = folder / source.name.replace("pytorch_model-", "model-").replace(".bin", ".safetensors")
        expected = torch.load(source, weights_only=True)
        converted = load_file(target)
        assert set(converted) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(converted[name], tensor), name

    single = tmp_path / "weights.pth"
    torch.save({"model": _state_dict(), "epoch": 1}, single)
    convert_main([str(single)])
    converted = load_file(tmp_path / "weights.safetensors")
    for name, tensor in _state_dict().items():
        assert converted[name].dtype == tensor.dtype and torch.equal(converted[name], tensor.detach()), name
    with pytest.raises(SystemExit, match="exists already"):
        convert_main([str(single)])


def test_folder_without_weights_names_what_it_expects(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        open_checkpoint(tmp_path)


def _lavis_name(name: str) -> str:
    """transformers' BLIP-2 name -> LAVIS's, written from LAVIS's module layout (Qformer.bert, ln_vision, ...)."""
    vision = "vision_model.encoder.layers."
    for old, new in (("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
                     ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
                     ("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj."),
                     ("vision_model.post_layernorm.", "ln_vision."), ("language_projection.", "opt_proj."),
                     ("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm.")):
        if name.startswith(old):
            return new + name[len(old):]
    if name.startswith(vision):
        layer, rest = name[len(vision):].split(".", 1)
        rest = rest.replace("layer_norm", "norm").replace("self_attn.projection", "attn.proj")
        return f"visual_encoder.blocks.{layer}.{rest.replace('self_attn.', 'attn.')}"
    if name.startswith("qformer."):
        return "Qformer.bert." + name[len("qformer."):].replace("attention.attention.", "attention.self.")
    return name


def test_lavis_training_file_overlays_a_base_folder(tmp_path):
    """A LAVIS fine-tuning .pth holds only what training changed, under LAVIS's names; the base
    Hugging Face folder supplies the rest, and the result is the fine-tuned model."""
    base = save_tiny_blip2(tmp_path / "base", OPT)
    from transformers import Blip2ForConditionalGeneration

    tuned = Blip2ForConditionalGeneration.from_pretrained(base).eval()
    gen = torch.Generator().manual_seed(7)
    trained = {}
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if name.startswith(("qformer.", "query_tokens", "language_projection.", "vision_model.post_layernorm.",
                                "vision_model.encoder.layers.1.", "vision_model.embeddings.")):
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
                trained[name] = param.detach().clone()
    lavis = {}
    for name, tensor in trained.items():
        if name.endswith("self_attn.qkv.bias"):  # LAVIS keeps q and v biases apart; k has none
            q, _, v = tensor.chunk(3)
            stem = _lavis_name(name)[: -len("qkv.bias")]
            lavis[stem + "q_bias"], lavis[stem + "v_bias"] = q, v
        else:
            lavis[_lavis_name(name)] = tensor
    lavis["Qformer.bert.embeddings.position_ids"] = torch.arange(8)[None]  # a buffer LAVIS saves too
    pth = tmp_path / "checkpoint_best.pth"
    torch.save({"model": lavis, "optimizer": {"state": {}}, "epoch": 4}, pth)

    ours = from_pretrained(base, weights=pth)
    x = np.random.default_rng(1).standard_normal((2, 3, 28, 28)).astype(np.float32)
    ids = np.array([[60] * 4 + [5, 6, 7]] * 2, np.int64)
    with torch.no_grad():
        expected = tuned(pixel_values=torch.from_numpy(x), input_ids=torch.from_numpy(ids)).logits.numpy()
    got = ours(pixel_values=x, input_ids=ids, attention_mask=np.ones_like(ids)).logits.asnumpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    plain = from_pretrained(base)(pixel_values=x, input_ids=ids, attention_mask=np.ones_like(ids)).logits.asnumpy()
    assert np.abs(plain - expected).max() > 1e-2, "the overlay must change the model"

    lavis["Qformer.cls.predictions.bias"] = torch.zeros(3)  # stage-1 head: not part of this model
    torch.save({"model": lavis}, pth)
    with pytest.raises(CheckpointError, match="Qformer.cls.predictions.bias"):
        from_pretrained(base, weights=pth)
