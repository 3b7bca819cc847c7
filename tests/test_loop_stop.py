"""Loop-proof decoding: generation stops a row in a repetition loop (models.generation.LoopStop), the captioner
layer re-generates it once with the checkpoint's sampling, and the row records repetition and retried."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import transformers

from models.generation import GenerateOutput, LoopStop, _LoopWatch
from models.layers import init_weights
from models.llama import LlamaForCausalLM
from pipeline import distributed
from pipeline.captioning import cli
from pipeline.captioning.caption_colour import ColourCaptioner
from pipeline.captioning.results import LOOP_COLUMNS, caption_batch
from pipeline.captioning.runner import RunOptions, run
from pipeline.datasets import caption_text
from pipeline.datasets.caption_text import Cleanup, cut_repetition
from tests.test_captioner_results import caption, make_videos

distributed.setup("CPU")  # at collection, before any kernel runs, so in-process captioning can use it
LOOP = "the cat the cat the cat the cat the cat"


def first_stop(tokens, stop: LoopStop = LoopStop()) -> int | None:
    """The index of the token at which the watch says the row loops, or None."""
    watch = _LoopWatch(stop, 1, len(tokens))
    for i, token in enumerate(tokens):
        if watch.push(np.array([token]))[0]:
            return i
    return None


def test_thresholds_are_the_clean_ups():
    stop = LoopStop()
    assert (stop.min_repeats, stop.min_words, stop.max_unit_words) == (
        caption_text.MIN_REPEATS, caption_text.MIN_LOOP_WORDS, caption_text.MAX_UNIT_WORDS)


@pytest.mark.parametrize("period", [1, 2, 3, 4, 7])
def test_a_loop_is_caught_one_copy_after_the_clean_up_would_cut_it(period):
    copies = 1 + max(3, math.ceil(6 / period))  # one copy more than the rule needs (a run may start mid-word)
    unit = list(range(100, 100 + period))
    prefix = [5, 6, 7, 8, 9]
    assert first_stop(prefix + unit * 20) == len(prefix) + copies * period - 1
    assert first_stop(prefix + unit * (copies - 1) + [1]) is None, "one copy fewer is not stopped"


def test_legitimate_repetition_is_not_stopped():
    assert first_stop([1, 2, 1, 2, 1, 2, 3, 1, 2, 1, 2, 1, 2, 4]) is None  # three short copies, twice
    assert first_stop([5] * 6 + [4] + [5] * 6) is None
    assert first_stop(list(range(60)) * 2) is None  # a long unit said twice


PIECES = [" the", " ca", "t", "s", ".", " ,", "!", " a", "\n", "-"]


def piece_stop(pieces: list[str]) -> LoopStop:
    return LoopStop(word_start=np.array([p[:1].isspace() and len(p.strip()) > 0 for p in pieces]),
                    has_word=np.array([any(c.isalnum() for c in p) for p in pieces]))


def test_every_stop_is_a_loop_the_clean_up_cuts():
    """Random texts over word pieces (some continue a word, some are punctuation only): wherever the watch
    stops a row, the clean-up finds a loop in its text."""
    stop = piece_stop(PIECES)
    rng = np.random.default_rng(0)
    stops = 0
    for _ in range(400):
        unit = rng.integers(0, len(PIECES), rng.integers(1, 6)).tolist()
        tokens = rng.integers(0, len(PIECES), rng.integers(0, 8)).tolist() + unit * int(rng.integers(1, 12))
        at = first_stop(tokens, stop)
        if at is not None:
            stops += 1
            assert cut_repetition("".join(PIECES[t] for t in tokens[:at + 1])).repetition, tokens[:at + 1]
    assert stops > 50


def test_word_pieces_and_punctuation():
    stop = piece_stop(PIECES)
    cats = [0, 1, 2]  # " the ca t": two words of three tokens
    assert first_stop(cats * 10, stop) == 4 * 3 - 1
    assert first_stop([5] * 40, stop) is None, "' , , ,' holds no word: the clean-up keeps it"
    assert first_stop([2] * 40, stop) is None, "'ttttt' is one word"


def test_ids_past_the_tokenizer_are_no_words():
    stop = piece_stop(PIECES)
    assert first_stop([0, 1, 2, 50, 51] * 10, stop) == 4 * 5 - 1, "the unit's words come from ids 0 to 2"
    assert first_stop([50, 51] * 40, stop) is None


def test_for_tokenizer_finds_word_starts(tmp_path):
    from tests.tiny_models import save_word_tokenizer

    tokenizer = save_word_tokenizer(tmp_path, 40, {"<pad>": 0, "</s>": 1, "<unk>": 2})
    stop = cli.loop_stop(tokenizer)
    assert not stop.word_start[:3].any() and not stop.has_word[:3].any(), "special tokens decode to nothing"
    assert stop.word_start[3:].all() and stop.has_word[3:].all(), "a word-level tokenizer's words"


@pytest.fixture(scope="module")
def looping_llama():
    """A random model with small weights: greedy decoding loops in some rows, not in others."""
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   eos_token_id=7, pad_token_id=0)
    ms.set_seed(0)
    model = LlamaForCausalLM(cfg)
    init_weights(model, std=0.1)
    return model, np.random.default_rng(0).integers(10, 1000, (8, 12))


@pytest.mark.parametrize("kw", [dict(), dict(do_sample=True, top_k=0, temperature=0.1)])
def test_generation_stops_looping_rows_and_continues_the_others(looping_llama, kw):
    model, prompts = looping_llama
    full = model.generate(input_ids=prompts, max_new_tokens=60, seed=3, **kw)
    streamed = []
    out = model.generate(input_ids=prompts, max_new_tokens=60, seed=3, stop_repetition=LoopStop(),
                         streamer=streamed.append, **kw)
    stopped = out.stopped_repeating
    assert not full.stopped_repeating.any()
    assert 0 < stopped.sum() < len(prompts), "the setting should loop in some rows only"
    ends = np.stack(streamed) >= 0
    lengths = ends.sum(0)
    width = full.sequences.shape[1]
    for row in range(len(prompts)):
        end = prompts.shape[1] + lengths[row]
        np.testing.assert_array_equal(out.sequences[row, :end], full.sequences[row, :end])
        if stopped[row]:
            assert end < width and (out.sequences[row, end:] == 0).all(), "padding after the stop"
            assert first_stop(full.sequences[row, prompts.shape[1]:]) == lengths[row] - 1
        else:
            np.testing.assert_array_equal(out.sequences[row], full.sequences[row, :out.sequences.shape[1]])


def test_beam_search_ignores_the_stop(looping_llama):
    model, prompts = looping_llama
    plain = model.generate(input_ids=prompts[:2], max_new_tokens=20, num_beams=2)
    watched = model.generate(input_ids=prompts[:2], max_new_tokens=20, num_beams=2, stop_repetition=LoopStop())
    np.testing.assert_array_equal(plain.sequences, watched.sequences)
    assert not watched.stopped_repeating.any()


def write_generation_config(folder: Path, **values) -> Path:
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, **values}))
    return folder


def test_retry_sampling_comes_from_the_checkpoint(tmp_path):
    qwen3 = dict(do_sample=True, temperature=0.6, top_p=0.95, top_k=40, repetition_penalty=1.0)
    options = cli.loop_retry_sampling(str(write_generation_config(tmp_path, **qwen3)), seed=5)
    assert {k: options[k] for k in qwen3} == qwen3
    assert options["seed"].random() == np.random.default_rng(5).random()
    partial = cli.loop_retry_sampling(str(write_generation_config(tmp_path, do_sample=True, top_k=50)), seed=0)
    assert partial["top_k"] == 50 and partial["temperature"] == 0.7 and partial["repetition_penalty"] == 1.05
    qwen25 = dict(do_sample=True, temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=1.05)
    greedy = cli.loop_retry_sampling(str(write_generation_config(tmp_path, **qwen25)), seed=0)
    assert {k: greedy[k] for k in qwen25} == cli.LOOP_RETRY_SAMPLING, "greedy in effect: Qwen's defaults"
    (tmp_path / "generation_config.json").unlink()
    assert {k: v for k, v in cli.loop_retry_sampling(str(tmp_path), 0).items() if k != "seed"} == \
        cli.LOOP_RETRY_SAMPLING


class LoopingCaptioner(ColourCaptioner):
    """The first video of the first call loops; a retry answers ``again`` (a caption, looping or not)."""

    extra_columns = LOOP_COLUMNS

    def __init__(self, loop_retry: dict | None, again: str = "a red square"):
        super().__init__(num_frames=3)
        self.loop_retry = loop_retry
        self.again = again
        self.calls: list[tuple[int, dict | None]] = []

    def generate(self, batch, options=None):
        self.calls.append((len(batch), options))
        if options is not None:
            return [{"text": self.again, "repetition": str(self.again == LOOP).lower(), "retried": "false"}
                    for _ in batch]
        return [{"text": LOOP if i == 0 and len(self.calls) == 1 else text, "repetition": str(i == 0).lower(),
                 "retried": "false"} for i, text in enumerate(batch)]


def test_rows_record_repetition_and_retried(tmp_path):
    csv_path = make_videos(tmp_path, ["small", "medium"])
    retry = dict(do_sample=True, temperature=0.7)
    captioner = LoopingCaptioner(retry)
    rows = caption(captioner, csv_path)
    assert captioner.calls == [(2, None), (1, retry)], "only the looping video is generated again"
    assert rows["small.mp4"]["text"] == "a red square"
    assert (rows["small.mp4"]["repetition"], rows["small.mp4"]["retried"]) == ("false", "true")
    assert (rows["medium.mp4"]["repetition"], rows["medium.mp4"]["retried"]) == ("false", "false")


def test_a_retry_that_loops_again_keeps_repetition(tmp_path):
    csv_path = make_videos(tmp_path, ["small"])
    out = tmp_path / "out.csv"
    run(LoopingCaptioner({"do_sample": True}, again=LOOP),
        RunOptions(input=str(csv_path), output=str(out), num_workers=1, cleanup=Cleanup()))
    row = next(iter(caption_rows(out)))
    assert (row["repetition"], row["retried"]) == ("true", "true")
    assert row["text"] == "the cat" and row["text_raw"] == LOOP, "the clean-up cuts the loop: one column"
    assert list(row).count("repetition") == 1


def caption_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_without_retry_options_the_first_answer_stands(tmp_path):
    captioner = LoopingCaptioner(None)
    [result] = caption_batch(captioner, ["x"], LOOP_COLUMNS)
    assert captioner.calls == [(1, None)]
    assert result.text == LOOP and result.columns == {"repetition": "true", "retried": "false"}


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory) -> Path:
    from tests.test_qwen2vl import save_checkpoint

    folder = save_checkpoint(tmp_path_factory.mktemp("qwen_loop"))
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=0.6, top_p=0.9, top_k=30, repetition_penalty=1.02)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_qwen_captioner_retries_with_the_checkpoints_sampling(qwen_checkpoint, monkeypatch):
    from pipeline.captioning.caption_qwen2vl import build_captioner, build_parser
    from tests.test_qwen2vl import frames

    args = build_parser().parse_args(["x.csv", "--pretrained_model_name_or_path", str(qwen_checkpoint),
                                      "--num_frames", "2", "--height", "56", "--width", "84",
                                      "--max_new_tokens", "8"])
    captioner = build_captioner(args, "float32")
    video = captioner.prepare(frames(0, 2))
    seen = []

    def spy(input_ids, return_dict_in_generate=False, **kwargs):
        seen.append(kwargs)
        loop = np.array([[10, 11] * 4]) if len(seen) == 1 else np.array([[10, 11, 12, 2, 0, 0, 0, 0]])
        return GenerateOutput(np.concatenate([input_ids, loop], 1), stopped_repeating=np.array([len(seen) == 1]))

    monkeypatch.setattr(captioner.model, "generate", spy)
    [result] = caption_batch(captioner, [video], captioner.extra_columns)
    first, again = seen
    assert isinstance(first["stop_repetition"], LoopStop) and "do_sample" not in first
    assert {k: again[k] for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")} == dict(
        do_sample=True, temperature=0.6, top_p=0.9, top_k=30, repetition_penalty=1.02)
    assert isinstance(again["seed"], np.random.Generator) and "stop_repetition" in again
    assert (result.columns["repetition"], result.columns["retried"], result.columns["truncated"]) == (
        "false", "true", "false")


def test_flags_off_restore_todays_captioner(qwen_checkpoint):
    from pipeline.captioning.caption_qwen2vl import Qwen2VLCaptioner, build_captioner, build_parser

    base = ["x.csv", "--pretrained_model_name_or_path", str(qwen_checkpoint), "--max_new_tokens", "8"]
    off = build_captioner(build_parser().parse_args(base + ["--no-stop_repetition"]), "float32")
    assert "stop_repetition" not in off.generate_kwargs and off.loop_retry is None
    assert off.extra_columns == Qwen2VLCaptioner.extra_columns
    no_retry = build_captioner(build_parser().parse_args(base + ["--no-loop_retry"]), "float32")
    assert no_retry.loop_retry is None and "stop_repetition" in no_retry.generate_kwargs


def test_flags_in_yaml(tmp_path):
    from pipeline.captioning.caption_qwen2vl import build_parser
    from pipeline.config import parse_with_config

    config = tmp_path / "c.yaml"
    config.write_text("stop_repetition: false\nloop_retry: false\n")
    args = parse_with_config(build_parser(), ["x.csv", "--config", str(config)])
    assert args.stop_repetition is False and args.loop_retry is False


@pytest.mark.parametrize("family", ["blip2", "llava", "pllava", "video_llama", "qwen2_5_vl"])
def test_every_captioner_stops_and_retries_loops(family, tmp_path, monkeypatch):
    """Each entry script turns --stop_repetition on by default, passes the loop rule to generate, records the
    loop columns, and re-generates a looping caption with the retry's sampling (Qwen's, as these tiny
    checkpoints recommend none)."""
    import importlib

    from pipeline.config import parse_with_config
    from tests.test_runtime_env import CAPTIONERS

    script, save, flags = CAPTIONERS[family]
    module = importlib.import_module(f"pipeline.captioning.{script}")
    folder = save(tmp_path / family)
    argv = ["x.csv", "--pretrained_model_name_or_path", str(folder), "--max_new_tokens", "8", *flags]
    base = module.base_config(argv) if hasattr(module, "base_config") else module.BASE_CONFIG
    args = parse_with_config(module.build_parser(), argv, base)
    captioner = module.build_captioner(args, "float32")
    assert captioner.loop_retry is not None and set(LOOP_COLUMNS) <= set(captioner.extra_columns)
    spec = captioner.frame_spec
    count = spec.num_frames or 4
    video = captioner.prepare(np.random.default_rng(0).integers(0, 256, (count, 64, 96, 3), np.uint8))
    seen = []

    def spy(*positional, input_ids=None, return_dict_in_generate=False, **kwargs):
        seen.append(kwargs)
        new = np.tile([10, 11], (len(input_ids), 4))
        sequences = new if family == "video_llama" else np.concatenate([input_ids, new], 1)  # its new ids only
        return GenerateOutput(sequences, stopped_repeating=np.full(len(input_ids), len(seen) == 1))

    monkeypatch.setattr(captioner.model, "generate", spy)
    [result] = caption_batch(captioner, [video], captioner.extra_columns)
    first, again = seen
    assert isinstance(first["stop_repetition"], LoopStop) and "do_sample" not in first
    assert {k: again[k] for k in cli.LOOP_RETRY_SAMPLING} == cli.LOOP_RETRY_SAMPLING
    assert isinstance(again["seed"], np.random.Generator)
    assert result.error is None
    assert (result.columns["repetition"], result.columns["retried"]) == ("false", "true")


def test_the_enhancer_stops_and_retries_loops(tmp_path, monkeypatch):
    from pipeline.captioning import enhance_captions
    from tests.test_enhance import save_chat_model

    save_chat_model(tmp_path / "model")
    table = tmp_path / "in.csv"
    table.write_text("path,text,status,error\nv.mp4,a red square moves,ok,\n")
    from pipeline.config import parse_with_config

    args = parse_with_config(enhance_captions.build_parser(), [str(table), "--pretrained_model_name_or_path",
                             str(tmp_path / "model"), "--max_new_tokens", "8"], enhance_captions.BASE_CONFIG)
    enhancer = enhance_captions.build_enhancer(args, "float32")
    seen = []

    def spy(input_ids=None, attention_mask=None, **kwargs):
        seen.append(kwargs)
        new = np.tile([10, 11], (len(input_ids), 4))
        return GenerateOutput(np.concatenate([input_ids, new], 1),
                              stopped_repeating=np.full(len(input_ids), len(seen) == 1))

    monkeypatch.setattr(enhancer.model, "generate", spy)
    cells = {"path": "v.mp4", "text": "a red square moves", "status": "ok", "error": ""}
    [result] = caption_batch(enhancer, [enhancer.prepare(cells)], enhancer.extra_columns)
    assert isinstance(seen[0]["stop_repetition"], LoopStop) and seen[1]["do_sample"] is True
    assert result.text == "a red square moves"
    assert (result.columns["repetition"], result.columns["retried"]) == ("false", "true")
