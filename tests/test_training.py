"""Training of the BLIP-2 video captioner (CE, resume, LoRA, SCST, data parallel) on tiny random models."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import load_file

from models import from_pretrained
from pipeline.training import train as train_mod
from pipeline.training.checkpointing import export_model
from pipeline.training.lora import apply_lora, merge_lora, reseed_lora_dropout
from pipeline.config import ConfigError
from pipeline.training.objectives import CaptionEncoder, contrastive_loss
from pipeline.training.optim import AdamW, clip_scale
from pipeline.training.scst import ScstConfig, make_candidates, normalised_logprobs
from tests.msrun import run_msrun
from tests.tiny_models import OPT, T5, save_tiny_blip2

ms.set_device("CPU")
REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (0, 0, 255), "green": (0, 255, 0), "blue": (255, 0, 0), "yellow": (0, 255, 255)}
SHAPES = ("square", "circle")


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory) -> Path:
    return save_tiny_blip2(tmp_path_factory.mktemp("opt"), OPT, seed=5)


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory) -> Path:
    return save_tiny_blip2(tmp_path_factory.mktemp("t5"), T5, seed=6)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A CSV of 8 'videos' (still images: a coloured shape) with two captions each."""
    folder = tmp_path_factory.mktemp("data")
    rows = ["path,text"]
    for colour, bgr in COLOURS.items():
        for shape in SHAPES:
            image = np.full((40, 40, 3), 30, np.uint8)
            if shape == "square":
                cv2.rectangle(image, (10, 10), (30, 30), bgr, -1)
            else:
                cv2.circle(image, (20, 20), 10, bgr, -1)
            cv2.imwrite(str(folder / f"{colour}_{shape}.png"), image)
            rows += [f"{colour}_{shape}.png,a {colour} {shape}", f"{colour}_{shape}.png,the {shape} is {colour}"]
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    return folder / "train.csv"


def flags(folder: Path, data: Path, out: Path, **overrides) -> list[str]:
    values = dict(pretrained=folder, train_annotations=data, output_dir=out, device="CPU", num_frames=2,
                  batch_size=4, max_steps=4, lr=1e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.05,
                  num_workers=1, save_every=0, log_every=1, seed=3, max_new_tokens=6, min_new_tokens=1,
                  jit=False)  # tiny models run faster in PyNative than they compile
    values.update(overrides)
    argv = []
    for key, value in values.items():
        if isinstance(value, bool):
            argv.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def weights(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(folder / "model.safetensors"))


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in after if not np.array_equal(before[k], after[k])}


TRAINED = ("query_tokens", "qformer.", "language_projection.")


def subset(dataset: Path, name: str, rows: int) -> Path:
    """The first ``rows`` (video, caption) pairs of the dataset, next to it."""
    path = dataset.with_name(name)
    path.write_text("\n".join(dataset.read_text().splitlines()[:rows + 1]) + "\n")
    return path


@pytest.fixture(scope="module")
def ce_run(opt_folder, dataset, tmp_path_factory):
    """6 CE updates on a 4-pair dataset with batch 4 (every update sees the same captions), constant lr."""
    out = tmp_path_factory.mktemp("ce")
    results = train_mod.main(flags(opt_folder, subset(dataset, "four.csv", 4), out, max_steps=6, lr=3e-3,
                                   min_lr=3e-3, save_every=2))
    return SimpleNamespace(losses=[r.loss for r in results], grad_norms=[r.grad_norm for r in results], out=out)


def test_ce_trains_only_the_qformer_and_loss_decreases(ce_run, opt_folder):
    losses = ce_run.losses
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.85 * losses[0], losses
    before, after = weights(opt_folder), weights(ce_run.out / "final")
    assert set(after) <= set(before)
    diff = changed(before, after)
    assert diff and all(k.startswith(TRAINED) for k in diff), sorted(diff)[:5]
    assert {k for k in after if k.startswith(TRAINED)} - diff <= {k for k in after if "key.bias" in k}
    assert from_pretrained(ce_run.out / "final").config.num_query_tokens == 4  # the export is a model folder


def test_ce_per_video_targets_equal_the_same_pairs(opt_folder, dataset, tmp_path):
    """ce_references video (2 videos, all 2 captions each, every video encoded once) takes the update
    that pair mode takes on the same 4 (video, caption) pairs; --train_language_model trains the OPT too."""
    four = subset(dataset, "four.csv", 4)  # red_square x 2 captions, red_circle x 2 captions
    common = dict(max_steps=1, lr=1e-3, min_lr=1e-3, train_language_model=True)
    pairs = train_mod.main(flags(opt_folder, four, tmp_path / "pairs", batch_size=4, **common))
    videos = train_mod.main(flags(opt_folder, four, tmp_path / "videos", batch_size=2, ce_references="video",
                                  **common))
    np.testing.assert_allclose(videos[0].loss, pairs[0].loss, rtol=1e-6)
    a, b = weights(tmp_path / "pairs" / "final"), weights(tmp_path / "videos" / "final")
    for key in a:  # attention key biases get ~0 gradients, which Adam turns into lr-sized noise
        if not key.endswith(("key.bias", "k_proj.bias")):
            np.testing.assert_allclose(b[key], a[key], atol=1e-5, rtol=0, err_msg=key)
    diff = changed(weights(opt_folder), a)
    assert any(k.startswith("language_model.") for k in diff)
    assert all(k.startswith(TRAINED + ("language_model.",)) for k in diff), sorted(diff)[:5]


def test_contrastive_term_matches_a_reference_on_transformers_opt(opt_folder):
    """The contrastive term equals InfoNCE computed by hand from our query outputs and transformers' OPT reading
    the captions alone (final hidden state at each eos), and its gradient reaches the vision encoder."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    model = from_pretrained(opt_folder)
    model.use_jit = False
    pixels = np.random.default_rng(1).standard_normal((3, 2, 3, 28, 28)).astype(np.float32)
    captions, rows = [[5, 6, 7, 2], [8, 9, 2], [10, 11, 12, 13, 2], [14, 2]], np.array([0, 0, 1, 2])
    videos = model.get_image_features(pixels).asnumpy().mean(1)
    hf = Blip2ForConditionalGeneration.from_pretrained(opt_folder).eval()
    with torch.no_grad():
        texts = np.stack([hf.language_model(input_ids=torch.tensor([ids]), output_hidden_states=True)
                          .hidden_states[-1][0, -1].numpy() for ids in captions])
    videos /= np.linalg.norm(videos, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    sims = videos @ texts.T / 0.1
    own = np.zeros(sims.shape, bool)
    own[rows, np.arange(4)] = True
    col = sims - np.log(np.exp(sims).sum(0, keepdims=True))
    row = sims - np.log(np.exp(sims).sum(1, keepdims=True))
    expected = (-col[own].mean() - np.mean([np.log(np.exp(row[b][own[b]]).sum()) for b in range(3)])) / 2

    vision = [p for n, p in model.parameters_and_names() if n.startswith("vision_model.")]
    loss, grads = ms.value_and_grad(lambda: contrastive_loss(model, model.get_image_features(pixels), captions,
                                                             rows, temperature=0.1), None, vision)()
    np.testing.assert_allclose(float(loss.asnumpy()), expected, rtol=1e-5)
    assert sum(float(np.abs(g.asnumpy()).sum()) for g in grads) > 0


def test_contrastive_term_needs_an_opt_model(t5_folder, dataset, tmp_path):
    with pytest.raises(ConfigError, match="contrastive_weight.*OPT"):
        train_mod.main(flags(t5_folder, dataset, tmp_path, contrastive_weight=1.0))


def test_lora_t5_keeps_base_weights(t5_folder, dataset, tmp_path, monkeypatch):
    """LoRA on q, v: base LM weights bit-identical (saved separately), adapters and Q-Former trained;
    the validation videos are captioned and scored at the end."""
    scored = {}

    def score_captions(predictions, references):
        scored.update(predictions=predictions, references=references)
        return {"CIDEr": 0.5}

    monkeypatch.setattr("pipeline.training.evaluate.score_captions", score_captions)
    val = subset(dataset, "val.csv", 4)
    results = train_mod.main(flags(t5_folder, dataset, tmp_path, max_steps=2, lora_targets=["q", "v"],
                                   lora_save="separate", val_annotations=val, num_beams=2))
    assert all(np.isfinite(r.loss) for r in results)
    assert sorted(scored["predictions"]) == sorted(scored["references"]) == ["red_circle.png", "red_square.png"]
    saved = json.loads((tmp_path / "eval" / "update-00000002.json").read_text())
    assert saved["update"] == 2 and saved["scores"] == {"CIDEr": 0.5} and saved["captions"] == scored["predictions"]
    before, after = weights(t5_folder), weights(tmp_path / "final")
    diff = changed(before, after)
    assert diff and all(k.startswith(TRAINED) for k in diff)
    adapters = load_file(str(tmp_path / "final" / "lora.safetensors"))
    assert len(adapters) == 2 * 2 * 6  # (A, B) x {q, v} x (2 encoder self + 2 decoder self + 2 cross)
    assert any(np.abs(v).max() > 0 for k, v in adapters.items() if k.endswith("lora_B"))


def test_lora_merge_gives_same_outputs(t5_folder, tmp_path):
    model = from_pretrained(t5_folder)
    wrapped = apply_lora(model, ["q", "v"], rank=4, alpha=8, dropout=0.1, seed=1)
    rng = np.random.default_rng(0)
    for name, param in model.parameters_and_names():
        if name.endswith("lora_B"):
            param.set_data(ms.Tensor(rng.normal(0, 0.3, param.shape).astype(np.float32)))
    x = rng.standard_normal((2, 2, 3, 28, 28)).astype(np.float32)
    ids = np.array([[60] * 4 + [5, 6, 1]] * 2)
    dec = rng.integers(2, 50, (2, 5))
    model.set_train(True)  # dropout: fresh masks per call, replayed after re-seeding with the same generator
    train_logits = []
    for _ in range(2):
        reseed_lora_dropout(model, np.random.default_rng(7))
        train_logits += [model(pixel_values=x, input_ids=ids, decoder_input_ids=dec).logits.asnumpy() for _ in "ab"]
    assert not np.allclose(train_logits[0], train_logits[1]) and np.array_equal(train_logits[:2], train_logits[2:])
    model.set_train(False)
    lora_logits = model(pixel_values=x, input_ids=ids, decoder_input_ids=dec).logits.asnumpy()
    lora_gen = model.generate(pixel_values=x, input_ids=ids, max_new_tokens=5, num_beams=2)
    assert merge_lora(model) == len(wrapped)
    export_model(model, tmp_path, exclude=(".lora_A", ".lora_B"))
    exported = from_pretrained(tmp_path)  # a plain checkpoint of the original architecture
    for merged, jit in ((model, True), (exported, False)):  # in place: graphs compiled before the merge
        logits = merged(pixel_values=x, input_ids=ids, decoder_input_ids=dec).logits.asnumpy()
        np.testing.assert_allclose(logits, lora_logits, atol=1e-5, rtol=0)
        generated = merged.generate(pixel_values=x, input_ids=ids, max_new_tokens=5, num_beams=2, use_jit=jit)
        np.testing.assert_array_equal(generated, lora_gen)
    base = from_pretrained(t5_folder)(pixel_values=x, input_ids=ids, decoder_input_ids=dec).logits.asnumpy()
    assert np.abs(base - lora_logits).max() > 1e-3  # the adapters did something


def test_resume_continues_with_the_same_losses(opt_folder, dataset, tmp_path):
    """A run stopped after update 2 leaves checkpoint-2; resumed from it, updates 3 and 4 equal the
    uninterrupted run's. 6 training pairs / batch 2 = 3 updates per epoch, so the run crosses an epoch
    boundary; LoRA dropout is on and the lr schedule (warmup + cosine) is not constant."""
    common = dict(max_steps=4, batch_size=2, save_every=2, lora_targets=["q_proj", "v_proj"], lora_dropout=0.2,
                  warmup_steps=2, export=False)
    small = subset(dataset, "six.csv", 6)
    full = [r.loss for r in train_mod.main(flags(opt_folder, small, tmp_path / "a", **common))]
    assert [p.name for p in sorted((tmp_path / "a").glob("checkpoint-*"))] == \
        ["checkpoint-00000002", "checkpoint-00000004"]
    shutil.copytree(tmp_path / "a" / "checkpoint-00000002", tmp_path / "b" / "checkpoint-00000002")
    resumed = train_mod.main(flags(opt_folder, small, tmp_path / "b", **common) + ["--resume"])
    assert len(resumed) == 2
    np.testing.assert_allclose([r.loss for r in resumed], full[2:], rtol=1e-6, atol=0)
    assert json.loads((tmp_path / "b" / "checkpoint-00000004" / "state.json").read_text())["step"] == 4
    a, b = (load_file(str(tmp_path / d / "checkpoint-00000004" / "trainable.safetensors")) for d in "ab")
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-6, rtol=0, err_msg=key)


def test_scst_raises_logprob_of_rewarded_candidate(opt_folder):
    model = from_pretrained(opt_folder)
    from transformers import AutoTokenizer

    encoder = CaptionEncoder(model, AutoTokenizer.from_pretrained(opt_folder), prompt="a video of")
    pixels = np.random.default_rng(0).standard_normal((2, 2, 3, 28, 28)).astype(np.float32)
    config = ScstConfig(num_candidates=3, max_new_tokens=5, min_new_tokens=2, use_jit=False)
    model.use_jit = False

    def reward(candidates, refs):  # reward 1 for the first beam of each video, 0 for the others
        return np.array([1.0 if i % 3 == 0 else 0.0 for i in range(len(candidates))])

    args = train_mod.build_parser().parse_args(["--mode", "scst", "--scst_num_candidates", "3", "--max_new_tokens",
                                                "5", "--min_new_tokens", "2", "--lr", "2e-4", "--warmup_steps", "0",
                                                "--max_grad_norm", "0", "--no-jit"])
    cands = make_candidates(model, encoder, pixels, [["a red square"]] * 2, reward, config, np.random.default_rng(0))
    assert cands.tokens.input_ids.shape[0] == 6
    np.testing.assert_allclose(cands.advantages, [2 / 3, -1 / 3, -1 / 3] * 2)
    before = normalised_logprobs(model, pixels, cands.tokens).asnumpy()
    trainable = train_mod.configure_trainable(model, args)
    trainer = train_mod.Trainer(model, encoder, trainable, args, total_steps=1, reward_fn=reward)
    result = trainer.train_step([SimpleNamespace(pixel_values=pixels, captions=[("a red square",)] * 2)])
    expected_loss = -(cands.advantages * before).sum() / 6
    assert abs(result.loss - expected_loss) < 1e-5
    after = normalised_logprobs(model, pixels, cands.tokens).asnumpy()
    assert (after[[0, 3]] > before[[0, 3]]).all(), (before, after)
    assert (after[[1, 2, 4, 5]] < before[[1, 2, 4, 5]]).mean() >= 0.5


def test_scst_mode_from_the_command_line(opt_folder, dataset, tmp_path):
    """mode scst: beams scored by CIDEr-D against each video's references (df from the training set)."""
    results = train_mod.main(flags(opt_folder, dataset, tmp_path, mode="scst", max_steps=1, batch_size=2,
                                   scst_num_candidates=3, lr=1e-5, min_lr=1e-6, export=False))
    assert len(results) == 1 and np.isfinite(results[0].loss) and 0.0 <= results[0].reward <= 10.0


def test_two_worker_msrun_matches_one_worker(ce_run, opt_folder, dataset, tmp_path):
    """2 ranks x batch 2 (gradients all-reduced) take the updates 1 process with batch 4 takes (2 updates)."""
    argv = flags(opt_folder, subset(dataset, "four.csv", 4), tmp_path / "two", batch_size=2, max_steps=2,
                 lr=3e-3, min_lr=3e-3, export=False)
    result = run_msrun(REPO / "pipeline" / "training" / "train.py", argv, cwd=tmp_path, workers=2)
    assert result.returncode == 0, result.problems
    logged = re.findall(r"update (\d+): loss ([\d.]+) lr \S+ grad_norm ([\d.]+)", result.logs)
    assert [int(step) for step, _, _ in logged] == [1, 2]  # rank 0 logs alone
    np.testing.assert_allclose([float(loss) for _, loss, _ in logged], ce_run.losses[:2], rtol=1e-4)
    np.testing.assert_allclose([float(norm) for _, _, norm in logged], ce_run.grad_norms[:2], rtol=1e-3)
    name = "checkpoint-00000002/trainable.safetensors"
    one, two = load_file(str(ce_run.out / name)), load_file(str(tmp_path / "two" / name))
    assert set(one) == set(two) and changed(weights(opt_folder), one)
    # Adam divides by |gradient|: elements whose gradient is ~0 (e.g. attention key biases, which softmax
    # ignores) move by up to lr on float noise alone, so compare almost every element tightly
    diff = np.concatenate([np.abs(one[k] - two[k]).ravel() for k in one if "attention.key.bias" not in k])
    assert (diff > 1e-6).mean() < 1e-3 and diff.max() < 1e-4, (diff > 1e-6).sum()


def test_adamw_matches_torch():
    """Bias-corrected AdamW with decoupled decay (torch.optim.AdamW), compiled and eager; no decay on biases."""
    import torch

    rng = np.random.default_rng(0)
    values = {"layer.weight": rng.standard_normal((3, 4)), "layer.bias": rng.standard_normal(4)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in values.items()} for _ in range(3)]
    lrs = [1e-2, 5e-3, 1e-3]
    ref = {k: torch.tensor(v, requires_grad=True) for k, v in values.items()}
    opt = torch.optim.AdamW([{"params": [ref["layer.weight"]], "weight_decay": 0.1},
                             {"params": [ref["layer.bias"]], "weight_decay": 0.0}], lr=1.0, eps=1e-8)
    for g, lr in zip(grads, lrs):
        for k, p in ref.items():
            p.grad = torch.tensor(g[k])
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    for use_jit in (True, False):
        params = [(k, ms.Parameter(ms.Tensor(v.astype(np.float32)), name=f"{k}.{use_jit}")) for k, v in values.items()]
        ours = AdamW(params, weight_decay=0.1, use_jit=use_jit)
        for g, lr in zip(grads, lrs):
            ours.step(tuple(ms.Tensor(g[k].astype(np.float32)) for k, _ in params), lr)
        for k, p in params:
            np.testing.assert_allclose(p.asnumpy(), ref[k].detach().numpy(), atol=1e-6, err_msg=f"{k} jit={use_jit}")


def test_clipping_inside_the_update_matches_torch():
    """clip_scale + AdamW.step(grad_scale) = torch's clip_grad_norm_ then AdamW, clipped or not."""
    import torch

    rng = np.random.default_rng(1)
    values = {"w": rng.standard_normal((5, 3)), "b": rng.standard_normal(3)}
    grads = [{k: s * rng.standard_normal(v.shape) for k, v in values.items()} for s in (3.0, 0.01, 2.0)]
    ref = {k: torch.tensor(v, requires_grad=True) for k, v in values.items()}
    opt = torch.optim.AdamW(list(ref.values()), lr=1e-2, weight_decay=0.0)
    params = [(k, ms.Parameter(ms.Tensor(v.astype(np.float32)), name=f"clip.{k}")) for k, v in values.items()]
    ours = AdamW(params, weight_decay=0.0)
    for g in grads:
        for k, p in ref.items():
            p.grad = torch.tensor(g[k])
        want_norm = float(torch.nn.utils.clip_grad_norm_(list(ref.values()), 1.0))
        opt.step()
        tensors = tuple(ms.Tensor(g[k].astype(np.float32)) for k, _ in params)
        scale, norm = clip_scale(tensors, 1.0)
        assert norm == pytest.approx(want_norm, rel=1e-6)
        assert (scale < 1.0) == (want_norm > 1.0)
        ours.step(tensors, 1e-2, scale)
    for k, p in params:
        np.testing.assert_allclose(p.asnumpy(), ref[k].detach().numpy(), atol=1e-6, err_msg=k)


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "train").glob("*.yaml")), ids=lambda p: p.stem)
def test_configs_parse(config):
    args = train_mod.parse_with_config(train_mod.build_parser(), ["--config", str(config), "--pretrained", "/m"])
    assert args.pretrained == "/m" and args.batch_size == 64 and args.weight_decay == 0.05
    assert (args.mode, args.num_frames, args.max_steps, args.lr, args.min_lr) in (
        ("ce", 8, 15000, 5e-5, 1e-5), ("scst", 16, 20000, 1e-5, 1e-6))
