"""What the bundled demo model is built from: the word tokenizer and the frame-time embedding."""
from __future__ import annotations

from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from transformers import AutoTokenizer, Blip2Config

from models import from_pretrained
from models.blip2.modeling import Blip2ForConditionalGeneration
from models.blip2.vision import Blip2VisionModel, temporal_patch_size
from models.checkpoint import CheckpointError, load_checkpoint
from models.layers import init_weights, sincos_grid_positions
from pipeline.training import word_tokenizer
from pipeline.training.checkpointing import export_model
from tests.tiny_models import OPT, QFORMER, VISION

ms.set_device("CPU")


def test_word_tokenizer_round_trip(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text('path,text\na.mp4,A red circle moves left\nb.mp4,"the circle moves left, it is red"\n'
                   "c.mp4,a blue square grows\n")
    word_tokenizer.main([str(csv), "--output", str(tmp_path / "tok"), "--vocab_size", "40"])
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tok.convert_ids_to_tokens(list(range(5))) == list(word_tokenizer.SPECIALS)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids("<image>") == word_tokenizer.IMAGE_ID
    # the most frequent words get the first ids; upper case folds; the prompt's words are included
    assert tok.convert_ids_to_tokens(list(range(5, 10))) == ["a", "circle", "left", "moves", "red"]
    ids = tok("A video of a red circle")["input_ids"]
    assert ids[0] == 1 and word_tokenizer.UNK_ID not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a video of a red circle"
    assert tok("a green triangle", add_special_tokens=False)["input_ids"][1:] == [3, 3]  # unseen words
    assert tok.decode(tok("the circle moves left, it is red")["input_ids"], skip_special_tokens=True) == \
        "the circle moves left , it is red"


def test_word_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="more than the model's vocab_size 6"):
        word_tokenizer.build_word_tokenizer(["one two three"], vocab_size=6)
    csv = tmp_path / "c.csv"
    csv.write_text("path,caption\na.mp4,hello\n")
    with pytest.raises(ValueError, match="no 'text' column.*--column"):
        word_tokenizer.caption_texts([csv])
    assert word_tokenizer.caption_texts([csv], column="caption") == ["hello"]


def _model(positions: int) -> Blip2ForConditionalGeneration:
    config = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=OPT, num_query_tokens=4,
                         image_token_index=60, num_frame_positions=positions)
    model = Blip2ForConditionalGeneration(config)
    init_weights(model, std=0.2, seed=1)
    model.use_jit = False
    model.set_train(False)
    return model


@pytest.mark.parametrize("use_jit", [False, True])
def test_frame_positions_make_the_model_see_frame_order(use_jit):
    """Without the table, cross-attention over all frames' tokens cannot tell a clip from its reverse;
    compiled and PyNative give the same features."""
    frames = np.random.default_rng(0).standard_normal((2, 4, 3, 28, 28)).astype(np.float32)
    reverse = np.ascontiguousarray(frames[:, ::-1])
    blind, seeing = _model(0), _model(4)
    blind.use_jit = seeing.use_jit = use_jit
    seeing.frame_chunk = 3  # chunks cross video boundaries and the last one is padded
    np.testing.assert_allclose(blind.get_image_features(reverse).asnumpy(),
                               blind.get_image_features(frames).asnumpy(), atol=1e-5)
    forward = seeing.get_image_features(frames).asnumpy()
    assert np.abs(seeing.get_image_features(reverse).asnumpy() - forward).max() > 1e-2
    seeing.use_jit = not use_jit
    np.testing.assert_allclose(seeing.get_image_features(frames).asnumpy(), forward, atol=1e-5)


def test_frame_positions_get_gradients_through_the_compiled_encoder():
    frames = np.random.default_rng(1).standard_normal((2, 4, 3, 28, 28)).astype(np.float32)
    model = _model(4)
    grads = []
    for use_jit in (False, True):
        model.use_jit = use_jit
        loss = lambda: (model.get_image_features(frames) ** 2).sum()  # noqa: E731
        grads.append(ms.value_and_grad(loss, None, [model.frame_position_embedding])()[1][0].asnumpy())
    assert np.abs(grads[0]).min() > 0
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("frames, rows", [(1, [0]), (2, [0, 3]), (4, [0, 1, 2, 3]), (8, [0, 0, 1, 1, 2, 2, 3, 3])])
def test_any_frame_count_maps_onto_the_table(frames, rows):
    model = _model(4)
    table = model.frame_position_embedding.asnumpy()
    np.testing.assert_array_equal(model.frame_times(2, frames).asnumpy(), table[rows + rows])


def test_frame_positions_save_and_load(tmp_path):
    model = _model(4)
    export_model(model, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    np.testing.assert_array_equal(loaded.frame_position_embedding.asnumpy(), model.frame_position_embedding.asnumpy())
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    del tensors["frame_position_embedding"]
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="frame_position_embedding"):
        from_pretrained(tmp_path / "m")



def test_frame_query_groups_equal_a_transformers_qformer_run_group_by_group():
    """Query group t cross-attends to frame t's tokens only: the outputs equal a reference composed from
    transformers' Q-Former layers (same weights) whose cross-attention runs once per (query group, frame) pair."""
    torch = pytest.importorskip("torch")
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel as HfQFormer

    model = _model(4)
    model.config.frame_query_groups = True
    grouped = Blip2ForConditionalGeneration(model.config)
    grouped.set_train(False)
    for (_, ours), (_, theirs) in zip(grouped.parameters_and_names(), model.parameters_and_names()):
        ours.set_data(theirs.value())
    hf = HfQFormer(model.config.qformer_config).eval()
    missing = hf.load_state_dict({k: torch.tensor(v.asnumpy()) for k, v in model.qformer.parameters_and_names()},
                                 strict=False).missing_keys
    assert not [k for k in missing if "position_ids" not in k], missing
    frames, n = 2, model.tokens_per_frame
    tokens = np.random.default_rng(2).standard_normal((2, frames * n, 32)).astype(np.float32)
    queries = torch.tensor(model.query_tokens.asnumpy()).expand(2, -1, -1)
    encoder, per_group = torch.tensor(tokens), 4 // frames

    def reference(groups: int) -> np.ndarray:
        h = hf.layernorm(queries)
        for layer in hf.encoder.layer:
            h = layer.attention(hidden_states=h)
            if layer.has_cross_attention:
                q, k = 4 // groups, frames * n // groups
                h = torch.cat([layer.crossattention(hidden_states=h[:, g * q:(g + 1) * q],
                                                    encoder_hidden_states=encoder[:, g * k:(g + 1) * k])
                               for g in range(groups)], dim=1)
            h = layer.feed_forward_chunk_query(h)
        return h.numpy()

    with torch.no_grad():
        whole = hf(query_embeds=queries, encoder_hidden_states=encoder).last_hidden_state.numpy()
        np.testing.assert_allclose(reference(1), whole, atol=1e-6)  # the composition is transformers' forward
        want = reference(frames)
    assert per_group == 2
    got = grouped.qformer(grouped.query_tokens.broadcast_to((2, -1, -1)), ms.Tensor(tokens), frames).asnumpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    ungrouped = model.qformer(model.query_tokens.broadcast_to((2, -1, -1)), ms.Tensor(tokens)).asnumpy()
    np.testing.assert_allclose(ungrouped, whole, atol=1e-5)
    assert np.abs(ungrouped - got).max() > 1e-3, "the grouping should change what the queries see"


def test_frame_query_groups_run_compiled_and_refuse_a_frame_count_that_does_not_divide_the_queries():
    model = _model(4)
    model.config.frame_query_groups = True
    grouped = Blip2ForConditionalGeneration(model.config)
    init_weights(grouped, std=0.2, seed=1)
    grouped.set_train(False)
    clip = np.random.default_rng(3).standard_normal((2, 4, 3, 28, 28)).astype(np.float32)
    grouped.use_jit = False
    eager = grouped.get_image_features(clip).asnumpy()
    grouped.use_jit = True
    np.testing.assert_allclose(grouped.get_image_features(clip).asnumpy(), eager, atol=1e-5)
    changed = clip.copy()
    changed[:, 3] += 1.0  # the last frame only
    before, after = eager, grouped.get_image_features(changed).asnumpy()
    assert np.abs(after - before).max() > 1e-3
    with pytest.raises(ValueError, match="4 queries are grouped per frame.*got 3 frames: sample 4"):
        grouped.get_image_features(clip[:, :3])


def _tubelet_model(tmp_path: Path) -> Blip2ForConditionalGeneration:
    """4 queries grouped per 2-frame tubelet, saved and loaded again through the published-folder loader."""
    config = Blip2Config(vision_config={**VISION, "temporal_patch_size": 2}, qformer_config=QFORMER,
                         text_config=OPT, num_query_tokens=4, image_token_index=60, num_frame_positions=2,
                         frame_query_groups=True)
    model = Blip2ForConditionalGeneration(config)
    init_weights(model, std=0.2, seed=4)
    export_model(model, tmp_path / "tubelets")
    loaded = from_pretrained(tmp_path / "tubelets")
    loaded.set_train(False)
    for (name, ours), (_, theirs) in zip(loaded.parameters_and_names(), model.parameters_and_names()):
        np.testing.assert_array_equal(ours.asnumpy(), theirs.asnumpy(), err_msg=name)
    return loaded


def test_tubelets_equal_a_transformers_vision_model_with_a_six_channel_patch(tmp_path):
    """With temporal_patch_size 2 a patch sees two consecutive frames: the tokens equal transformers' vision
    model whose patch convolution takes 6 channels (frame 2t's RGB, then frame 2t + 1's), same weights."""
    torch = pytest.importorskip("torch")
    from transformers.models.blip_2.modeling_blip_2 import Blip2VisionModel as HfVision

    model = _tubelet_model(tmp_path)
    assert model.vision_model.embeddings.patch_embedding.weight.shape == (32, 6, 14, 14)
    torch.manual_seed(0)
    hf = HfVision(model.config.vision_config).eval()
    hf.embeddings.patch_embedding = torch.nn.Conv2d(6, 32, 14, 14)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_checkpoint(Blip2VisionModel(model.config.vision_config), tmp_path / "hf")
    clip = np.random.default_rng(5).standard_normal((2, 4, 3, 28, 28)).astype(np.float32)
    pairs = torch.cat([torch.tensor(clip[:, 0::2]), torch.tensor(clip[:, 1::2])], dim=2).reshape(4, 6, 28, 28)
    with torch.no_grad():
        want = hf(pairs).last_hidden_state.numpy()
    got = ours(model.tubelets(ms.Tensor(clip)).reshape(4, 6, 28, 28)).asnumpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_tubelets_see_order_within_a_pair_and_refuse_frame_counts_they_cannot_split(tmp_path):
    model = _tubelet_model(tmp_path)
    clip = np.random.default_rng(6).standard_normal((2, 4, 3, 28, 28)).astype(np.float32)
    model.use_jit = False
    eager = model.get_image_features(clip).asnumpy()
    model.use_jit = True
    np.testing.assert_allclose(model.get_image_features(clip).asnumpy(), eager, atol=1e-5)
    assert eager.shape == (2, 4, 32)
    swapped = clip[:, [1, 0, 2, 3]]
    assert np.abs(model.get_image_features(swapped).asnumpy() - eager).max() > 1e-2
    image = clip[:, 0]  # an image is a tubelet of one frame repeated
    np.testing.assert_allclose(model.get_image_features(image).asnumpy(),
                               model.get_image_features(clip[:, [0, 0]]).asnumpy(), atol=1e-5)
    with pytest.raises(ValueError, match="takes 2 frames per patch.*got 3 frames: sample 4"):
        model.get_image_features(clip[:, :3])
    with pytest.raises(ValueError, match="grouped per 2-frame tubelet.*got 6 frames: sample 4"):
        model.get_image_features(np.concatenate([clip, clip[:, :2]], axis=1))


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "blip2_opt.json"


def test_cross_attention_init_scale_multiplies_only_the_cross_attention_value_and_output():
    from pipeline.training import train as train_mod

    def fresh(scale: str) -> dict[str, np.ndarray]:
        args = train_mod.build_parser().parse_args(["--model_config", str(DEMO_CONFIG), "--seed", "1",
                                                    "--cross_attention_init_scale", scale])
        return {n: p.asnumpy() for n, p in train_mod.build_model(args, "float32").parameters_and_names()}

    plain, scaled = fresh("1"), fresh("5")
    grown = [n for n in plain if n.endswith(train_mod.CROSS_ATTENTION_PROJECTIONS)]
    assert len(grown) == 2 * 2  # value and output matrices of the demo's two Q-Former layers
    for name in plain:
        np.testing.assert_allclose(scaled[name], plain[name] * (5 if name in grown else 1), rtol=1e-6, err_msg=name)
    assert np.std(plain[grown[0]]) > 0.01


def test_fan_in_init_scales_projections_by_their_fan_in_and_keeps_tables_at_the_std():
    config = Blip2Config.from_json_file(str(DEMO_CONFIG))
    normal, scaled = Blip2ForConditionalGeneration(config), Blip2ForConditionalGeneration(config)
    init_weights(normal, seed=2)
    init_weights(scaled, seed=2, fan_in=True)
    a = {n: p.asnumpy() for n, p in normal.parameters_and_names()}
    b = {n: p.asnumpy() for n, p in scaled.parameters_and_names()}
    patch_fan = 3 * temporal_patch_size(config.vision_config) * 16 * 16  # the demo's 2-frame tubelets: 6 channels
    fans = {"vision_model.embeddings.patch_embedding.weight": patch_fan,
            "qformer.encoder.layer.0.crossattention.attention.value.weight": 128,
            "language_model.model.decoder.layers.2.fc2.weight": 512, "language_projection.weight": 128}
    for name, fan in fans.items():
        np.testing.assert_allclose(b[name], a[name] / 0.02 * fan ** -0.5, rtol=1e-5, err_msg=name)
        assert abs(b[name].std() * fan ** 0.5 - 1) < 0.1, name
    for name in ("language_model.model.decoder.embed_tokens.weight", "query_tokens",
                 "vision_model.embeddings.position_embedding", "qformer.layernorm.weight"):
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)


def fresh_demo_weights(*flags: str) -> dict[str, np.ndarray]:
    """A fresh demo model's weights as the training script starts them (fan_in, seed 1, extra flags)."""
    from pipeline.training import train as train_mod

    args = train_mod.build_parser().parse_args(["--model_config", str(DEMO_CONFIG), "--seed", "1", "--init",
                                                "fan_in", *flags])
    return {n: p.asnumpy() for n, p in train_mod.build_model(args, "float32").parameters_and_names()}


def test_sincos_vision_positions_encode_each_patch_column_and_row():
    plain, sincos = fresh_demo_weights(), fresh_demo_weights("--vision_position_init", "sincos")
    name = "vision_model.embeddings.position_embedding"
    for other in plain:
        if other != name:
            np.testing.assert_array_equal(sincos[other], plain[other], err_msg=other)
    table = sincos[name][0]
    assert table.shape == (1 + 6 * 6, 128) and not table[0].any()  # 96 px at 16 px patches; the class token
    patches = table[1:].reshape(6, 6, 128)  # (row, column, channel)
    for row in range(6):
        for col in range(6):
            assert np.allclose(patches[row, col, :64], patches[0, col, :64]), (row, col)  # columns only
            assert np.allclose(patches[row, col, 64:], patches[row, 0, 64:]), (row, col)  # rows only
            # the fastest frequency (1 per patch): sin and cos of the column, then of the row
            np.testing.assert_allclose(patches[row, col, [0, 32, 64, 96]],
                                       [np.sin(col), np.cos(col), np.sin(row), np.cos(row)], atol=1e-6)
    step = [np.linalg.norm(patches[0, 0] - patches[0, c]) for c in range(1, 6)]
    assert step[0] < step[-1] and 0.3 < patches.std() < 1  # nearer columns alike; unit scale, not 0.02
    with pytest.raises(ValueError, match="divisible by 4, got 126"):
        sincos_grid_positions(6, 126)


def test_sincos_language_positions_fill_only_the_opt_position_table(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.training import train as train_mod
    from tests.tiny_models import T5, save_tiny_blip2

    plain, sincos = fresh_demo_weights(), fresh_demo_weights("--language_position_init", "sincos")
    name = "language_model.model.decoder.embed_positions.weight"
    for other in plain:
        if other != name:
            np.testing.assert_array_equal(sincos[other], plain[other], err_msg=other)
    table = sincos[name]
    assert table.shape == (64 + 2, 128)  # the demo's 64 positions and OPT's offset of 2
    rows = np.arange(66)
    # channel 0: sin of the row at frequency 1, channel 64: its cos; channel 1: the next frequency, 1e4^(-1/64)
    np.testing.assert_allclose(table[:, 0], np.sin(rows), atol=1e-6)
    np.testing.assert_allclose(table[:, 64], np.cos(rows), atol=1e-6)
    np.testing.assert_allclose(table[:, 1], np.sin(rows * 1e4 ** (-1 / 64)), atol=1e-6)
    assert 0.5 < table.std() < 1 and plain[name].std() < 0.03  # unit scale, not 0.02
    t5 = from_pretrained(str(save_tiny_blip2(tmp_path / "t5", T5)), dtype="float32")
    with pytest.raises(ConfigError, match="--language_position_init sincos needs an OPT language model"):
        train_mod.set_sincos_language_positions(t5)
