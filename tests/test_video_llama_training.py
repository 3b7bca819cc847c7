"""Training Video-LLaMA with pipeline.training.train (CE, SCST, export) on the tiny Video-LLaMA of test_video_llama."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from models import from_pretrained
from models.checkpoint import load_tokenizer
from pipeline.captioning.caption_videollama import main as videollama_main
from pipeline.datasets import synthetic
from pipeline.training import train as train_mod
from pipeline.training.objectives import CaptionEncoder, caption_loss
from tests.test_training import flags
from tests.test_video_llama import PROMPT, TorchVideoLlama, build_folder, videos

ms.set_device("CPU")
QUESTION = "Describe this video."
TRAIN_PROMPT = PROMPT.format(question=QUESTION)
VIDEO_BRANCH = ("video_encoder.video_query_tokens", "video_encoder.video_frame_position_embedding.",
                "video_encoder.video_Qformer.", "video_encoder.llama_proj.")


@pytest.fixture(scope="module")
def reference() -> TorchVideoLlama:
    return TorchVideoLlama(seed=3)


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory) -> Path:
    return build_folder(reference, tmp_path_factory.mktemp("video_llama"))


@pytest.fixture(scope="module")
def tokenizer(folder):
    return load_tokenizer(folder.parent / "llama")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """A CSV of 4 synthetic clips (8 frames of a moving shape) with 2 captions each."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        clip = synthetic.random_clip(rng)
        synthetic.write_video(root / f"clip{i}.mp4", synthetic.render(clip, num_frames=8, size=32, rng=rng))
        rows += [{"path": f"clip{i}.mp4", "text": text} for text in synthetic.captions(clip, rng, count=2)]
    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "train.csv"


def params(model) -> dict[str, np.ndarray]:
    return {name: p.asnumpy().copy() for name, p in model.parameters_and_names()}


def test_loss_matches_torch_reference(folder, reference, tokenizer):
    """The forward's loss (labels -100 on prompt, video slots and padding) and train.py's CE objective
    equal transformers' LlamaForCausalLM loss on the same embeddings."""
    model = from_pretrained(folder)
    encoder = CaptionEncoder(model, tokenizer, prompt=TRAIN_PROMPT)
    tokens = encoder.encode(encoder.caption_ids(["a red square moves left", "the blue circle grows"]))
    assert (tokens.labels[tokens.input_ids < 0] == -100).all() and tokens.token_counts.tolist() == [6, 5]
    pixels = videos(2, frames=3, seed=4)
    ours = model(pixels, tokens.input_ids, tokens.attention_mask, labels=tokens.labels).loss.asnumpy()
    objective = caption_loss(model, pixels, tokens, float(tokens.token_counts.sum())).asnumpy()
    with torch.no_grad():
        embeds = torch.cat([reference.prompt_embeds(pixels[i:i + 1], tokens.input_ids[i].tolist()) for i in range(2)])
        ref = reference.llama_model(inputs_embeds=embeds, attention_mask=torch.from_numpy(tokens.attention_mask),
                                    labels=torch.from_numpy(tokens.labels)).loss.item()
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    np.testing.assert_allclose(objective, ref, rtol=1e-5)


@pytest.fixture(scope="module")
def ce_run(folder, clips, tmp_path_factory):
    """5 CE updates on the 4 clips' first captions (batch 4: the same batch every update), constant lr."""
    out = tmp_path_factory.mktemp("ce")
    four = clips.with_name("four.csv")
    four.write_text("\n".join(clips.read_text().splitlines()[:5]) + "\n")
    trained = {}
    export = train_mod.export

    def keep_model(model, args, output_dir, tokenizer):
        trained["params"] = params(model)
        return export(model, args, output_dir, tokenizer)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_mod, "export", keep_model)
        results = train_mod.main(flags(folder, four, out, prompt=TRAIN_PROMPT, max_steps=5, lr=3e-3, min_lr=3e-3))
    return SimpleNamespace(out=out, losses=[r.loss for r in results], params=trained["params"])


def test_ce_loss_decreases_and_only_the_video_branch_changes(ce_run, folder):
    assert len(ce_run.losses) == 5 and all(np.isfinite(ce_run.losses))
    # the language model is frozen: only the 6 video slots it reads move the caption tokens' loss
    assert all(b < a for a, b in zip(ce_run.losses, ce_run.losses[1:])), ce_run.losses
    assert ce_run.losses[-1] < ce_run.losses[0] - 0.2, ce_run.losses
    before = params(from_pretrained(folder))
    assert set(before) == set(ce_run.params)
    changed = {name for name in before if not np.array_equal(before[name], ce_run.params[name])}
    assert all(name.startswith(VIDEO_BRANCH) for name in changed), sorted(changed)[:5]
    assert all(any(name.startswith(part) for name in changed) for part in VIDEO_BRANCH)
    saved = load_file(str(ce_run.out / "checkpoint-00000005" / "trainable.safetensors"))
    assert sorted(saved) == sorted(n for n in before if n.startswith("video_encoder."))


def test_export_loads_and_captions(ce_run, folder, clips, tmp_path):
    final = ce_run.out / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["checkpoint"] == "video_llama.safetensors" and not (final / "llama").exists()
    exported = params(from_pretrained(final))
    for name, value in ce_run.params.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    output = tmp_path / "captions.csv"
    videollama_main([str(clips), "--pretrained_model_name_or_path", str(final), "--num_frames", "2",
                     "--max_new_tokens", "6", "--question", QUESTION, "--device", "CPU", "--output", str(output)])
    with open(output, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and [r["status"] for r in rows] == ["ok"] * 4 and all(r["text"] for r in rows)


def test_scst_step(folder, clips, tmp_path):
    """One SCST update: beams of the prompt's continuation scored by CIDEr-D against each clip's captions."""
    results = train_mod.main(flags(folder, clips, tmp_path, mode="scst", prompt=TRAIN_PROMPT, max_steps=1,
                                   batch_size=2, scst_num_candidates=2, lr=1e-5, min_lr=1e-6, export=False))
    assert len(results) == 1 and np.isfinite(results[0].loss) and 0.0 <= results[0].reward <= 10.0
