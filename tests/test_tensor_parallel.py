"""Tensor parallelism (models.parallel): split models under msrun on CPU equal the whole model and transformers.

One msrun run of 2 workers loads each tiny model with tp_size 2: LLaVA-NeXT (Mistral decoder with one
key/value head, so both ranks keep a copy of it), Qwen2-VL (two key/value heads, one per rank), Qwen3-VL-MoE
(each rank 4 of the 8 experts beside its attention heads and half the dense layer's MLP) and BLIP-2 OPT (tied,
vocabulary-split embeddings). Both ranks' logits must equal transformers' and the
whole model's within 1e-4, and their greedy ids (and, for OPT, beam search and seeded sampling) must be
identical. Then 4 workers as tp 2 x dp 2 caption a table as one process does.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from models import parallel
from models.checkpoint import CheckpointError, load_checkpoint
from models.llama import LlamaForCausalLM
from tests.llava_fixtures import IMAGE_TOKEN as LLAVA_IMAGE, left_pad, save_checkpoint as save_llava
from tests.msrun import run_msrun
from tests.tiny_models import OPT, save_tiny_blip2
from tests.test_blip2_parity import prompts as blip2_prompts
from tests import test_qwen2vl as qwen
from tests import test_qwen3_vl_moe as moe

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 8  # tests/tp_worker.py generates this many


def _hf_outputs(hf, inputs: dict, alone: dict | None = None) -> dict:
    """transformers' logits and greedy ids. ``alone`` (pad id -> each row's own inputs): generate row by row
    without padding, laid out as our batched output (left padding, then pad after an early end)."""
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        logits = hf(**tensors).logits.numpy()
        if alone is None:
            ids = hf.generate(**tensors, max_new_tokens=NEW_TOKENS, do_sample=False).numpy()
        else:
            mask = inputs["attention_mask"]
            ids = np.full((len(mask), mask.shape[1] + NEW_TOKENS), alone["pad"], np.int64)
            for row, row_inputs in enumerate(alone["rows"]):
                pad = int((mask[row] == 0).sum())
                out = hf.generate(**{k: torch.from_numpy(v) for k, v in row_inputs.items()},
                                  max_new_tokens=NEW_TOKENS, do_sample=False).numpy()[0]
                ids[row, pad:pad + len(out)] = out
    return {"logits": logits, "ids": ids, "mask": inputs["attention_mask"].astype(bool)}


def _llava_next(folder: Path) -> tuple[dict, dict]:
    hf = save_llava(folder, "next")
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (40, 70, 3), dtype=np.uint8), rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)]
    processed = transformers.LlavaNextImageProcessor.from_pretrained(folder)(images, return_tensors="np")
    hf_processor = transformers.LlavaNextProcessor(
        image_processor=transformers.LlavaNextImageProcessor.from_pretrained(folder),
        tokenizer=transformers.AutoTokenizer.from_pretrained(folder), patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1)
    expanded = hf_processor(images=images, text=["<image>"] * 2, return_tensors="np")["input_ids"]
    counts = [int((row == LLAVA_IMAGE).sum()) for row in expanded]
    rows = [[7] + [LLAVA_IMAGE] * count + [int(t) for t in rng.integers(5, 90, 2 + 3 * i)]
            for i, count in enumerate(counts)]
    ids, mask = left_pad(rows)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=processed["pixel_values"],
                  image_sizes=processed["image_sizes"])
    return inputs, _hf_outputs(hf, inputs)


def _qwen2vl(folder: Path) -> tuple[dict, dict]:
    qwen.save_checkpoint(folder)
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    proc = qwen.Qwen2VLVisionProcessor.from_pretrained(folder)
    pixels, grids, prompts = qwen.video_batch(proc, [(3, 4, [24, 25, 26]), (4, 2, [27])])
    ids, mask = qwen.left_pad(prompts)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values_videos=np.concatenate(pixels),
                  video_grid_thw=np.concatenate(grids))
    rows = [dict(input_ids=np.array([p]), mm_token_type_ids=qwen.mm_token_types(np.array([p])),
                 pixel_values_videos=x, video_grid_thw=g) for p, x, g in zip(prompts, pixels, grids)]
    # transformers' batched Qwen2-VL generation gives padded rows other positions; one by one is the reference.
    # transformers 5 takes the processor's mm_token_type_ids (our model finds the videos from input_ids).
    hf_inputs = {**inputs, "mm_token_type_ids": qwen.mm_token_types(ids)}
    return inputs, _hf_outputs(hf, hf_inputs, alone={"pad": qwen.ENDOFTEXT, "rows": rows})


def _qwen3_vl_moe(folder: Path) -> tuple[dict, dict]:
    """Experts split over the ranks (4 of 8 each) beside tensor-parallel attention and a dense layer."""
    moe.hf_moe().save_pretrained(folder)
    return _qwen3_videos(transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(folder).eval())


def _qwen3_5_vl(folder: Path) -> tuple[dict, dict]:
    """Qwen3.5's vision-language model: Qwen3-VL's tower (no DeepStack) before the 3:1 hybrid decoder."""
    from tests.test_qwen3_5_vl import hf_model

    hf_model().save_pretrained(folder)
    return _qwen3_videos(transformers.Qwen3_5ForConditionalGeneration.from_pretrained(folder).eval())


def _qwen3_videos(hf) -> tuple[dict, dict]:
    """A left-padded batch of two videos in Qwen3-VL's prompt layout, and transformers' outputs row by row."""
    specs = [(2, moe.VIDEO_GRID, [24, 25]), (1, moe.SMALL_GRID, [26])]
    prompts = [moe.video_prompt(t, hw, words) for t, hw, words in specs]
    grids = [np.array([[t, *hw]]) for t, hw, _ in specs]
    pixels = [moe.pixels(50 + i, g[0]) for i, g in enumerate(grids)]
    ids, mask = qwen.left_pad(prompts)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values_videos=np.concatenate(pixels),
                  video_grid_thw=np.concatenate(grids))
    rows = [dict(input_ids=np.array([p]), mm_token_type_ids=qwen.mm_token_types(np.array([p])),
                 pixel_values_videos=x, video_grid_thw=g) for p, x, g in zip(prompts, pixels, grids)]
    hf_inputs = {**inputs, "mm_token_type_ids": qwen.mm_token_types(ids)}
    return inputs, _hf_outputs(hf, hf_inputs, alone={"pad": qwen.ENDOFTEXT, "rows": rows})


def _blip2_opt(folder: Path) -> tuple[dict, dict]:
    save_tiny_blip2(folder, OPT)
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    ids, mask = blip2_prompts(2, image_tokens=True)
    pixels = np.random.default_rng(11).standard_normal((2, 3, 28, 28)).astype(np.float32)
    inputs = dict(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    return inputs, _hf_outputs(hf, inputs)


def _qwen3_5(name: str):
    """Qwen3.5's hybrid decoder, dense 3:1 or MoE 2:1: Gated DeltaNet layers split by key heads."""
    def build(folder: Path) -> tuple[dict, dict]:
        from tests.test_qwen3_5_parallel import tp_family  # here: that module imports this one's _as_rank
        return tp_family(name)(folder)
    return build


FAMILIES = {"llava_next": _llava_next, "qwen2vl": _qwen2vl, "qwen3_vl_moe": _qwen3_vl_moe, "blip2_opt": _blip2_opt,
            "qwen3_5_dense": _qwen3_5("dense"), "qwen3_5_moe": _qwen3_5("moe"), "qwen3_5_vl": _qwen3_5_vl}


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    """Build the models and transformers' outputs, run the msrun workers; -> (out folder, references)."""
    root = tmp_path_factory.mktemp("tp")
    spec, references = {}, {}
    for name, build in FAMILIES.items():
        inputs, references[name] = build(root / name)
        np.savez(root / f"{name}_inputs.npz", **inputs)
        spec[name] = {"folder": str(root / name), "inputs": str(root / f"{name}_inputs.npz"),
                      "decoding": name == "blip2_opt"}
    (root / "spec.json").write_text(json.dumps(spec))
    out = root / "out"
    out.mkdir()
    result = run_msrun(ROOT / "tests/tp_worker.py", [str(root / "spec.json"), str(out)], cwd=root, timeout=900)
    assert result.returncode == 0, result.problems
    return out, references


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tp2_equals_tp1_and_transformers_on_every_rank(split_run, name):
    out, references = split_run
    ref = references[name]
    whole = np.load(out / f"{name}_tp1.npz")
    ranks = [np.load(out / f"{name}_tp2_rank{r}.npz") for r in range(2)]
    mask = ref["mask"]  # left padding's logits are meaningless
    for split in ranks:
        assert np.abs(split["logits"] - ref["logits"])[mask].max() < 1e-4
        assert np.abs(split["logits"] - whole["logits"])[mask].max() < 1e-4
        np.testing.assert_array_equal(split["ids"], ref["ids"][:, :split["ids"].shape[1]])
    np.testing.assert_array_equal(ranks[0]["logits"], ranks[1]["logits"])  # same bits on both ranks
    np.testing.assert_array_equal(ranks[0]["ids"], ranks[1]["ids"])
    np.testing.assert_array_equal(whole["ids"], ranks[0]["ids"])


def test_tp2_beams_and_seeded_sampling_decide_alike_on_every_rank(split_run):
    out, _ = split_run
    whole = np.load(out / "blip2_opt_tp1.npz")
    ranks = [np.load(out / f"blip2_opt_tp2_rank{r}.npz") for r in range(2)]
    for kind in ("beams", "sampled"):
        for split in ranks:
            np.testing.assert_array_equal(split[kind], whole[kind])
    assert not np.array_equal(whole["sampled"], whole["ids"])  # sampling did sample


# ---------------------------------------------------------------- single-process checks of the split layout


def _as_rank(rank: int, size: int) -> parallel.TensorParallelGroup:
    """A group position without a communicator: enough to build and load a rank's part, not to run it."""
    return parallel.TensorParallelGroup(size=size, rank=rank, first_rank=0, comm=_NoComm())


class _NoComm(parallel.Communicator):
    def reducer(self):
        return None

    def gatherer(self):
        return None


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[Path, transformers.LlamaConfig]:
    folder = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder, config


def test_each_rank_loads_only_its_slices(tiny_llama):
    folder, config = tiny_llama
    from safetensors.numpy import load_file

    full = load_file(str(folder / "model.safetensors"))
    for rank in range(2):
        with parallel.building(_as_rank(rank, 2)):
            model = LlamaForCausalLM(config)
        load_checkpoint(model, folder)
        params = {name: p.asnumpy() for name, p in model.parameters_and_names()}
        q = full["model.layers.0.self_attn.q_proj.weight"]
        np.testing.assert_array_equal(params["model.layers.0.self_attn.q_proj.weight"], q[16 * rank:16 * (rank + 1)])
        k = full["model.layers.1.self_attn.k_proj.weight"]  # 2 key/value heads of 8: one per rank
        np.testing.assert_array_equal(params["model.layers.1.self_attn.k_proj.weight"], k[8 * rank:8 * (rank + 1)])
        o = full["model.layers.0.self_attn.o_proj.weight"]
        np.testing.assert_array_equal(params["model.layers.0.self_attn.o_proj.weight"], o[:, 16 * rank:16 * (rank + 1)])
        down = full["model.layers.0.mlp.down_proj.weight"]
        np.testing.assert_array_equal(params["model.layers.0.mlp.down_proj.weight"], down[:, 32 * rank:32 * (rank + 1)])
        embed = full["model.embed_tokens.weight"]
        np.testing.assert_array_equal(params["model.embed_tokens.weight"], embed[48 * rank:48 * (rank + 1)])
        np.testing.assert_array_equal(params["model.norm.weight"], full["model.norm.weight"])  # replicated
        assert model.init_cache(1, 4)[0].shape == (1, 1, 4, 8)  # the cache holds this rank's head only


def test_fewer_key_value_heads_than_ranks_are_copied():
    with parallel.building(_as_rank(3, 4)):
        split = parallel.split_heads(8, 2, 16)
    assert (split.heads, split.kv_heads) == (2, 1)
    assert split.q_rows == (96, 128) and split.kv_rows == (16, 32)  # query heads 6, 7 read key/value head 1


def test_sizes_that_do_not_divide_fail_by_name(tiny_llama):
    _, config = tiny_llama
    with parallel.building(_as_rank(0, 3)), pytest.raises(parallel.TensorParallelError, match="num_attention_heads"):
        LlamaForCausalLM(config)
    with parallel.building(_as_rank(0, 8)), pytest.raises(parallel.TensorParallelError, match="num_key_value_heads"):
        parallel.split_heads(8, 3, 16)


def test_t5_refuses_a_split_and_a_wrong_checkpoint_is_named(tiny_llama, tmp_path):
    from tests.tiny_models import T5
    from models.t5 import T5ForConditionalGeneration

    with parallel.building(_as_rank(0, 2)), pytest.raises(parallel.TensorParallelError, match="T5"):
        T5ForConditionalGeneration(transformers.T5Config(**{k: v for k, v in T5.items() if k != "model_type"}))
    folder, config = tiny_llama
    wider = transformers.LlamaConfig(**{**config.to_dict(), "intermediate_size": 128})
    with parallel.building(_as_rank(1, 2)):
        model = LlamaForCausalLM(wider)
    with pytest.raises(CheckpointError, match=r"gate_proj.weight \(checkpoint \(64, 32\), model \(128, 32\)\)"):
        load_checkpoint(model, folder)


def test_without_msrun_tp_size_2_says_how_to_launch(tiny_llama):
    from models import from_pretrained

    with pytest.raises(parallel.TensorParallelError, match="msrun"):
        from_pretrained(tiny_llama[0], tp_size=2)


# ---------------------------------------------------------------- captioning: tp 2 x dp 2 under msrun


def test_tp2_dp2_captions_every_row_once_as_tp1(tmp_path):
    from pipeline.captioning.caption_qwen2vl import main as qwen_main
    from tests.video_factory import write_caption_clips

    checkpoint = qwen.save_checkpoint(tmp_path / "qwen2vl")
    (tmp_path / "videos").mkdir()
    table = write_caption_clips(tmp_path / "videos", qwen.SOURCES, clip_id="c{}")
    flags = ["--pretrained_model_name_or_path", str(checkpoint), "--bs", "2", *qwen.CLI]
    whole = tmp_path / "tp1.csv"
    qwen_main([str(table), "--output", str(whole), *flags])
    split = tmp_path / "tp2dp2.csv"
    result = run_msrun(ROOT / "pipeline/captioning/caption_qwen2vl.py",
                       [str(table), "--output", str(split), "--tp_size", "2", *flags], cwd=tmp_path, workers=4,
                       timeout=900)
    assert result.returncode == 0, result.problems
    assert "tensor-parallel rank 1 of 2 (ranks 2..3)" in result.logs
    want, got = qwen.read_rows(whole), qwen.read_rows(split)
    assert [r["clip_id"] for r in got] == [r["clip_id"] for r in want]  # each row once, in input order
    assert [(r["status"], r["text"]) for r in got] == [(r["status"], r["text"]) for r in want]
    assert sum(r["status"] == "ok" for r in got) == len(got) - 1  # the broken video is the one error row
    assert not list(tmp_path.glob("tp2dp2.csv.part*.csv"))


def test_sliced_reads_equal_slices_of_the_whole_tensor(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    from models import checkpoint

    rng = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(7, 5, 3, generator=rng), "b": torch.randn(6, 10, generator=rng).bfloat16(),
               "h": torch.randn(4, 9, generator=rng).half()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(checkpoint, "_CHUNK_BYTES", 64)  # column slices in several chunks of rows
    refs = checkpoint.open_checkpoint(tmp_path)
    for name, tensor in tensors.items():
        whole = tensor.float().numpy() if name == "b" else tensor.numpy()
        np.testing.assert_array_equal(refs[name].read(), whole)
        for dim in range(whole.ndim):
            index = (slice(None),) * dim + (slice(1, 3),)
            np.testing.assert_array_equal(refs[name].part(dim, 1, 3), whole[index])


def test_host_exchange_sums_gathers_and_refuses_different_sizes():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        comms = list(pool.map(lambda r: parallel.HostCommunicator(r, 3, f"unit-{id(pool)}"), range(3)))
        arrays = [np.arange(6, dtype=np.float32).reshape(2, 3) * (r + 1) for r in range(3)]
        sums = list(pool.map(lambda r: comms[r]._reduce(arrays[r]), range(3)))
        gathered = list(pool.map(lambda r: comms[r]._gather(arrays[r]), range(3)))
        for r in range(3):
            np.testing.assert_array_equal(sums[r], arrays[0] * 6)
            np.testing.assert_array_equal(gathered[r], np.concatenate(arrays, axis=-1))
        uneven = [np.ones((2, 3), np.float32), np.ones((1, 3), np.float32), np.ones((2, 3), np.float32)]
        futures = [pool.submit(comms[r]._reduce, uneven[r]) for r in range(3)]
        for future in futures:
            with pytest.raises(parallel.TensorParallelError, match="different sizes"):
                future.result(timeout=30)
