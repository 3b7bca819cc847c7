"""Video-LLaMA against a torch reference composed from transformers modules, on tiny random weights.

The weights are saved the way users have them: a BLIP-2 folder and a LLaMA folder
(``save_pretrained``) and a Video-LLaMA training ``.pth`` with LAVIS names.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import Blip2QFormerConfig, Blip2QFormerModel, LlamaConfig, LlamaForCausalLM

from models import from_pretrained
from models.checkpoint import CheckpointError
from models.video_llama.modeling import VIDEO_TOKEN_INDEX, build_prompt_ids
from pipeline.captioning.caption_videollama import main as videollama_main
from tests.tiny_models import OPT, _randomize, hf_blip2, save_word_tokenizer
from tests.video_factory import write_caption_clips

ms.set_device("CPU")
torch.set_num_threads(1)
ATOL = 1e-4
FRAME_POSITIONS = 8
NUM_VIDEO_QUERY = 6
VIDEO_QFORMER = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=False)
SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "###": 4}
PROMPT = "###Human: <Video><ImageHere></Video> {question}###Assistant:"


class TorchVideoLlama(torch.nn.Module):
    """Video-LLaMA's visual path, from transformers' BLIP-2 and Q-Former modules."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.blip2 = hf_blip2(OPT, image_token=False, seed=seed)
        image_width = self.blip2.config.qformer_config.hidden_size
        video_config = Blip2QFormerConfig(**VIDEO_QFORMER, cross_attention_frequency=1,
                                          encoder_hidden_size=image_width)
        self.video_Qformer = Blip2QFormerModel(video_config)
        self.video_query_tokens = torch.nn.Parameter(torch.zeros(1, NUM_VIDEO_QUERY, VIDEO_QFORMER["hidden_size"]))
        self.video_frame_position_embedding = torch.nn.Embedding(FRAME_POSITIONS, image_width)
        self.llama_proj = torch.nn.Linear(VIDEO_QFORMER["hidden_size"], LLAMA["hidden_size"])
        torch.manual_seed(seed)
        self.llama_model = LlamaForCausalLM(LlamaConfig(**LLAMA))
        _randomize(self, seed + 1)
        self.eval()

    @torch.no_grad()
    def video_embeds(self, pixels: np.ndarray) -> torch.Tensor:
        batch, frames = pixels.shape[:2]
        images = torch.from_numpy(pixels).flatten(0, 1)
        tokens = self.blip2.vision_model(images).last_hidden_state
        queries = self.blip2.query_tokens.expand(tokens.shape[0], -1, -1)
        frame_queries = self.blip2.qformer(query_embeds=queries, encoder_hidden_states=tokens).last_hidden_state
        frame_queries = frame_queries.reshape(batch, frames, *frame_queries.shape[1:])
        frame_queries = frame_queries + self.video_frame_position_embedding(torch.arange(frames))[None, :, None]
        video_queries = self.video_query_tokens.expand(batch, -1, -1)
        hidden = self.video_Qformer(query_embeds=video_queries,
                                    encoder_hidden_states=frame_queries.flatten(1, 2)).last_hidden_state
        return self.llama_proj(hidden)

    @torch.no_grad()
    def prompt_embeds(self, pixels: np.ndarray, ids: list[int]) -> torch.Tensor:
        """One video's prompt: text embeddings around its video slots."""
        start = ids.index(VIDEO_TOKEN_INDEX)
        embed = self.llama_model.get_input_embeddings()
        before, after = torch.tensor([ids[:start]]), torch.tensor([ids[start + NUM_VIDEO_QUERY:]])
        return torch.cat([embed(before), self.video_embeds(pixels), embed(after)], dim=1)

    def lavis_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained part under Video-LLaMA's names, with the buffers its .pth files carry."""
        state = {"video_query_tokens": self.video_query_tokens.detach().clone(),
                 "video_frame_position_embedding.weight": self.video_frame_position_embedding.weight.detach().clone(),
                 "llama_proj.weight": self.llama_proj.weight.detach().clone(),
                 "llama_proj.bias": self.llama_proj.bias.detach().clone(),
                 "video_Qformer.bert.embeddings.position_ids": torch.arange(512)[None],
                 "llama_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
        for name, value in self.video_Qformer.state_dict().items():
            name = re.sub(r"^layernorm\.", "bert.embeddings.LayerNorm.", name)
            name = re.sub(r"^encoder\.", "bert.encoder.", name).replace("attention.attention.", "attention.self.")
            state["video_Qformer." + name] = value.detach().clone()
        return state


def save_pth(path: Path, state: dict[str, torch.Tensor]) -> Path:
    optimizer = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    torch.save({"model": state, "optimizer": optimizer, "epoch": 3}, path)
    return path


def write_folder(folder: Path, checkpoint: str) -> Path:
    folder.mkdir(exist_ok=True)
    config = {"model_type": "video_llama", "blip2_model": "../blip2", "llama_model": "../llama",
              "checkpoint": checkpoint, "num_video_query_tokens": NUM_VIDEO_QUERY,
              "max_frame_pos": FRAME_POSITIONS, "video_qformer": VIDEO_QFORMER}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def reference() -> TorchVideoLlama:
    return TorchVideoLlama()


def build_folder(reference: TorchVideoLlama, root: Path) -> Path:
    """A Video-LLaMA folder (with its BLIP-2 and LLaMA folders and .pth beside it) of the reference's weights."""
    reference.blip2.save_pretrained(root / "blip2")
    reference.llama_model.save_pretrained(root / "llama")
    tokenizer = save_word_tokenizer(root / "llama", LLAMA["vocab_size"], SPECIALS)
    tokenizer.bos_token = "<s>"  # prepended to every text, as LLaMA's tokenizer does
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save_pretrained(root / "llama")
    save_pth(root / "finetune.pth", reference.lavis_state_dict())
    return write_folder(root / "video_llama", "../finetune.pth")


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory) -> Path:
    return build_folder(reference, tmp_path_factory.mktemp("video_llama"))


@pytest.fixture(scope="module")
def model(folder):
    return from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizer(folder):
    from models.checkpoint import load_tokenizer

    return load_tokenizer(folder.parent / "llama")


def videos(batch: int, frames: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, frames, 3, 28, 28)).astype(np.float32)


def left_pad(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    ids = np.array([[pad] * (width - len(r)) + r for r in rows], np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int64)
    return ids, mask


def test_logits_match_torch_reference(model, reference, tokenizer):
    pixels = videos(2)
    ids = build_prompt_ids(tokenizer, PROMPT.format(question="a video of"), NUM_VIDEO_QUERY)
    assert ids.count(VIDEO_TOKEN_INDEX) == NUM_VIDEO_QUERY
    assert ids[0] == LLAMA["bos_token_id"] and ids.count(LLAMA["bos_token_id"]) == 1, "BOS before the text only"
    got = model(pixels, np.array([ids, ids])).logits.asnumpy()
    for row in range(2):
        with torch.no_grad():
            embeds = reference.prompt_embeds(pixels[row:row + 1], ids)
            ref = reference.llama_model(inputs_embeds=embeds).logits.numpy()[0]
        np.testing.assert_allclose(got[row], ref, atol=ATOL, rtol=0)
    assert np.abs(got[0] - got[1]).max() > 1e-2, "logits should depend on the video"


def test_greedy_matches_torch_and_left_padded_batch(model, reference, tokenizer):
    """Prompts of different lengths in one left-padded batch give each row's one-by-one ids (= torch's)."""
    pixels = videos(3, frames=4, seed=2)
    prompts = [build_prompt_ids(tokenizer, PROMPT.format(question=q), NUM_VIDEO_QUERY)
               for q in ("a video of", "the red square moves left and grows", "big")]
    ids, mask = left_pad(prompts, SPECIALS["<pad>"])
    kwargs = dict(max_new_tokens=8, eos_token_id=LLAMA["eos_token_id"], pad_token_id=SPECIALS["<pad>"])
    batched = model.generate(pixels, ids, mask, **kwargs)
    for row, prompt in enumerate(prompts):
        one = model.generate(pixels[row:row + 1], np.array([prompt]), **kwargs)
        with torch.no_grad():
            ref = reference.llama_model.generate(inputs_embeds=reference.prompt_embeds(pixels[row:row + 1], prompt),
                                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                                 do_sample=False, num_beams=1, **kwargs).numpy()
        np.testing.assert_array_equal(one, ref)
        np.testing.assert_array_equal(batched[row, :one.shape[1]], one[0])
        assert (batched[row, one.shape[1]:] == SPECIALS["<pad>"]).all()


def test_missing_tensor_is_named(reference, folder):
    state = reference.lavis_state_dict()
    del state["video_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"]
    save_pth(folder.parent / "incomplete.pth", state)
    broken = write_folder(folder.parent / "broken", "../incomplete.pth")
    with pytest.raises(CheckpointError, match=r"incomplete\.pth.*missing: "
                                              r"video_Qformer\.encoder\.layer\.1\.crossattention\.attention\.key"):
        from_pretrained(broken)


def test_missing_source_is_named(folder):
    bad = write_folder(folder.parent / "no_pth", "../nowhere.pth")
    with pytest.raises(CheckpointError, match=r"checkpoint .*nowhere\.pth .*does not exist"):
        from_pretrained(bad)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_caption_script_batched_equals_one_by_one(folder, tmp_path):
    (tmp_path / "clips").mkdir()
    meta = write_caption_clips(tmp_path / "clips")
    common = [str(meta), "--pretrained_model_name_or_path", str(folder), "--num_frames", "3",
              "--max_new_tokens", "6", "--question", "a video of", "--device", "CPU"]
    batched, single = tmp_path / "b.csv", tmp_path / "s.csv"
    videollama_main(common + ["--output", str(batched), "--bs", "4"])
    videollama_main(common + ["--output", str(single), "--bs", "1"])
    rows = read_rows(batched)
    assert [r["clip_id"] for r in rows] == ["c00", "c01", "c02", "c03", "bad"]
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["error"]
    texts = [r["text"] for r in rows]
    assert texts == [r["text"] for r in read_rows(single)]
    assert all(texts[:4]) and len(set(texts[:4])) > 1, "captions should depend on the video"
