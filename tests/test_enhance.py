"""Caption enhancement: the text-only Qwen2 / Llama / Mistral decoders against transformers, and
enhance_captions.py end to end (chat template, error rows, resume after a SIGKILL)."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from jinja2.exceptions import TemplateError

from models import from_pretrained
from pipeline import distributed
from pipeline.captioning import enhance_captions
from pipeline.captioning.enhance_captions import CaptionEnhancer, load_template
from tests.msrun import kill_when_written
from tests.tiny_models import WORDS, _randomize, save_word_tokenizer

distributed.setup("CPU")  # at collection, before any kernel runs, so in-process enhancement can use it

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
FAMILIES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_theta=500000.0)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=4096)),
    # head_dim 12, not hidden / heads; Qwen3-MoE: 6 experts, top-2 unnormalised, a dense layer after a sparse one
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=12, tie_word_embeddings=True)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(head_dim=12, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=20,
                       norm_topk_prob=False, mlp_only_layers=[1])),
    # Qwen3.5's hybrid decoder: a Gated DeltaNet layer, then gated full attention with partial rotary
    "qwen3_5_text": (transformers.Qwen3_5TextConfig, transformers.Qwen3_5ForCausalLM,
                     dict(head_dim=8, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                          linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                          rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))),
}
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant {% endif %}")


def save_tiny(folder: Path, family: str, seed: int = 0, **config):
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    hf = model_class(config_class(**{**BASE, **extra, **config})).eval()
    _randomize(hf, seed)
    hf.save_pretrained(folder)
    return hf


def left_padded(seed: int = 0):
    rs = np.random.RandomState(seed)
    ids = rs.randint(4, VOCAB, (3, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_text_decoder_matches_transformers(tmp_path, family):
    hf = save_tiny(tmp_path, family)
    ours = from_pretrained(tmp_path)
    ids, mask = left_padded()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        ref_ids = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=10,
                              do_sample=False, pad_token_id=0, eos_token_id=2).numpy()
    logits = ours(input_ids=ids, attention_mask=mask).logits.asnumpy()
    assert np.abs(logits - ref)[mask == 1].max() < 1e-4
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, eos_token_id=2,
                        use_jit=False).sequences
    np.testing.assert_array_equal(got, ref_ids)
    assert len(set(map(tuple, got[:, ids.shape[1]:]))) == 3, "the rows must decode differently"


def test_templates_hold_the_caption():
    for name in ("expand", "concise", "t2v"):
        template = load_template(name)
        assert template["system"] and "{caption}" in template["user"]


def test_a_template_without_a_system_role_gets_it_in_the_user_turn(tmp_path):
    tokenizer = chat_tokenizer(tmp_path)
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
                               "{% endif %}" + CHAT_TEMPLATE)
    enhancer = SimpleNamespace(tokenizer=tokenizer, template={"system": "be brief", "user": "shorten {caption}"})
    ids = CaptionEnhancer.prompt_ids(enhancer, "a red square")
    merged = [{"role": "user", "content": "be brief\n\nshorten a red square"}]
    assert ids == tokenizer.apply_chat_template(merged, add_generation_prompt=True, return_dict=False)
    assert tokenizer.decode(ids).startswith("<s> ") and "a red square </s>" in tokenizer.decode(ids)


def chat_tokenizer(folder: Path):
    """A word tokenizer whose chat template marks turns with <s> ... </s>."""
    tokenizer = save_word_tokenizer(folder, VOCAB, SPECIALS)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def byte_level_chat_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer as Qwen2 ships one (Qwen2's pre-tokenizer split, NFC, byte-level decoding),
    learnt from the rewrite templates and caption words, with the chat template of ``chat_tokenizer``. Its
    alphabet is the characters of that text only, so whatever a random model generates decodes to text."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    texts = [" ".join(load_template(name).values()) for name in ("expand", "concise", "t2v")] + [" ".join(WORDS)]
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS)))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_chat_model(folder: Path):
    """A tiny Qwen2 "instruct" checkpoint (weights, a byte-level BPE tokenizer and a chat template), and the
    tokenizer transformers loads from it: transformers 5 loads any qwen2 folder's tokenizer as its byte-level
    BPE Qwen2Tokenizer, whatever the folder's tokenizer.json holds."""
    tokenizer = byte_level_chat_tokenizer(512)
    hf = save_tiny(folder, "qwen2", seed=1, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(folder)
    return hf, transformers.AutoTokenizer.from_pretrained(folder)


def reference_rewrite(hf, tokenizer, caption: str, template: dict, max_new_tokens: int) -> str:
    messages = [{"role": "system", "content": template["system"]},
                {"role": "user", "content": template["user"].replace("{caption}", caption)}]
    ids = torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                          eos_token_id=2)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


SLOW_RUN = """import sys, time
from pipeline.captioning import enhance_captions
generate = enhance_captions.CaptionEnhancer.generate
def slow(self, batch):
    time.sleep(0.4)
    return generate(self, batch)
enhance_captions.CaptionEnhancer.generate = slow
enhance_captions.main(sys.argv[1:])
"""


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_enhance_captions_resumes_after_a_kill(tmp_path):
    hf, tokenizer = save_chat_model(tmp_path / "model")
    words = "red green blue yellow square circle triangle moves left right up down grows shrinks bounces".split()
    rng = np.random.RandomState(0)
    n = 12
    rows = [{"path": f"videos/v{i:02d}.mp4", "id": str(i), "text": "a " + " ".join(rng.choice(words, 2 + i % 5)),
             "status": "ok", "error": ""} for i in range(n)]
    rows[3]["text"] = ""
    rows[5].update(text="", status="error", error="RuntimeError: cannot decode")
    csv_path = tmp_path / "meta.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)  # the videos do not exist: none is read
    out, part = tmp_path / "enhanced.csv", tmp_path / "enhanced.csv.part0.csv"
    flags = [str(csv_path), "--pretrained_model_name_or_path", str(tmp_path / "model"), "--template", "concise",
             "--max_new_tokens", "12", "--output", str(out), "--device", "CPU"]
    script = tmp_path / "slow_enhance.py"
    script.write_text(SLOW_RUN)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    kill_when_written([sys.executable, str(script), *flags, "--bs", "1"], tmp_path, env, part, 6)
    finished = read_rows(part)
    assert 5 <= len(finished) < n, "the kill should land mid-run"
    assert not out.exists()

    resumed = subprocess.run([sys.executable, "-m", "pipeline.captioning.enhance_captions", *flags, "--bs", "4"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    counts = re.search(r"(\d+) skipped \(already done\), (\d+) output rows captioned, (\d+) failed", resumed.stderr)
    skipped, done, failed = map(int, counts.groups())
    assert skipped == len(finished) and done + failed == n - len(finished), "no row may be enhanced twice"
    got = read_rows(out)
    assert [r["path"] for r in got] == [r["path"] for r in rows], "every row once, in input order"
    assert list(got[0]) == ["path", "id", "text", "status", "error", "text_enhanced", "truncated", "repetition",
                            "retried"]
    assert {r["path"]: r for r in got} | {r["path"]: r for r in finished} == {r["path"]: r for r in got}
    template = load_template("concise")
    for row, source in zip(got, rows):
        if source["id"] == "3":
            assert row["status"] == "error" and "caption (column 'text') is empty" in row["error"]
        elif source["id"] == "5":
            assert row["status"] == "error" and "input row is an error row" in row["error"]
            assert "cannot decode" in row["error"]
        else:
            assert row["status"] == "ok" and row["text"] == source["text"] and row["id"] == source["id"]
            assert row["text_enhanced"] == reference_rewrite(hf, tokenizer, source["text"], template, 12)
    assert len({r["text_enhanced"] for r in got if r["status"] == "ok"}) > 1


def test_an_error_row_keeps_the_input_caption(tmp_path, monkeypatch):
    """A row whose rewrite fails (here its prompt, in a batch retried row by row) and an input error row
    become error rows that keep the input caption in text; the other rows are rewritten."""
    save_chat_model(tmp_path / "model")
    rows = [{"path": "videos/a.mp4", "text": "a red square moves left", "status": "ok", "error": ""},
            {"path": "videos/b.mp4", "text": "a blue circle bounces", "status": "ok", "error": ""},
            {"path": "videos/c.mp4", "text": "a green triangle grows", "status": "error",
             "error": "RuntimeError: cannot decode"},
            {"path": "videos/d.mp4", "text": "a yellow square shrinks", "status": "ok", "error": ""}]
    csv_path, out = tmp_path / "meta.csv", tmp_path / "enhanced.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    prompt_ids = CaptionEnhancer.prompt_ids

    def failing(self, caption):
        if "circle" in caption:
            raise TemplateError("cannot render this caption")
        return prompt_ids(self, caption)

    monkeypatch.setattr(CaptionEnhancer, "prompt_ids", failing)
    enhance_captions.main([str(csv_path), "--pretrained_model_name_or_path", str(tmp_path / "model"),
                           "--template", "concise", "--max_new_tokens", "4", "--bs", "4", "--output", str(out),
                           "--device", "CPU"])
    got = read_rows(out)
    assert [r["text"] for r in got] == [r["text"] for r in rows]
    assert [r["status"] for r in got] == ["ok", "error", "error", "ok"]
    assert got[1]["error"] == "TemplateError: cannot render this caption" and got[1]["text_enhanced"] == ""
    assert "input row is an error row" in got[2]["error"] and got[2]["text_enhanced"] == ""


def test_a_row_the_process_died_on_keeps_the_input_caption(tmp_path):
    """A row left in flight by a dead process, out of attempts, is written as an error row at start-up (before
    any model is built) and still keeps its input caption in text."""
    save_chat_model(tmp_path / "model")
    rows = [{"path": "videos/a.mp4", "text": "a red square moves left"},
            {"path": "videos/b.mp4", "text": "a blue circle bounces"}]
    csv_path, out = tmp_path / "meta.csv", tmp_path / "enhanced.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    (tmp_path / "enhanced.csv.part0.inflight").write_text(json.dumps({"path": "videos/b.mp4"}) + "\n")
    enhance_captions.main([str(csv_path), "--pretrained_model_name_or_path", str(tmp_path / "model"),
                           "--template", "concise", "--max_new_tokens", "4", "--max_attempts", "1",
                           "--output", str(out), "--device", "CPU"])
    got = read_rows(out)
    assert [r["status"] for r in got] == ["ok", "error"]
    assert "died" in got[1]["error"]
    assert [r["text"] for r in got] == [r["text"] for r in rows]
