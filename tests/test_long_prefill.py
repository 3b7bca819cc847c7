"""Long prompts: blockwise prefill parity with transformers, linear memory, bounded compiles."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models import attention  # noqa: E402
from models.generation import bucket_batch, bucket_length  # noqa: E402
from models.jit import COMPILES  # noqa: E402
from models.llama import LlamaForCausalLM  # noqa: E402
from models.opt import OPTForCausalLM  # noqa: E402
from models.t5 import T5ForConditionalGeneration  # noqa: E402
from tests.test_lm_parity import VOCAB, build, opt_config, t5_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LENGTH = 70  # several 16-token attention blocks, not a multiple of 16


@pytest.fixture
def small_blocks():
    """Attention blocks of 16 tokens, so a 70-token prompt takes the blockwise path."""
    old = attention.block_size()
    attention.set_block_size(16)
    yield
    attention.set_block_size(old)


def llama_config():
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)


def padded_prompts():
    ids = np.random.RandomState(3).randint(3, VOCAB, (2, LENGTH))
    mask = np.ones_like(ids)
    mask[1, :23] = 0
    return ids, mask


def hf_greedy(hf, ids, mask, new):
    with torch.no_grad():
        return hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                           do_sample=False).numpy()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_blockwise_decoder_logits_and_greedy_equal_transformers(tmp_path, small_blocks, family):
    if family == "llama":
        hf, ours = build(transformers.LlamaForCausalLM, LlamaForCausalLM, llama_config(), tmp_path)
    else:
        hf, ours = build(transformers.OPTForCausalLM, OPTForCausalLM, opt_config(max_position_embeddings=256),
                         tmp_path)
    ids, mask = padded_prompts()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = ours(input_ids=ids, attention_mask=mask).logits.asnumpy()
    valid = mask == 1
    assert np.abs(got - ref)[valid].max() < 1e-4
    new = 6
    np.testing.assert_array_equal(ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new).sequences,
                                  hf_greedy(hf, ids, mask, new))


def test_blockwise_t5_encoder_equals_transformers(tmp_path, small_blocks):
    hf, ours = build(transformers.T5ForConditionalGeneration, T5ForConditionalGeneration, t5_config(), tmp_path)
    ids, mask = padded_prompts()
    mask = mask[:, ::-1].copy()
    labels = np.random.RandomState(4).randint(2, VOCAB, (2, 20))  # 20 decoder positions: blockwise too
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert np.abs(out.logits.asnumpy() - ref.logits.numpy()).max() < 1e-4
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5).sequences
    np.testing.assert_array_equal(got, hf_greedy(hf, ids, mask, 5))


def test_buckets_are_geometric():
    lengths = [bucket_length(n) for n in range(1, 40000)]
    assert all(b >= n for n, b in zip(range(1, 40000), lengths))
    sizes = sorted(set(lengths))
    assert all(b / a <= 1.25 or b - a == 8 for a, b in zip(sizes, sizes[1:]))
    assert len({bucket_length(n) for n in range(1000, 32769)}) <= 16
    assert [bucket_batch(n) for n in (1, 5, 8, 9, 11, 13, 16)] == [1, 5, 8, 10, 12, 15, 18]


def test_forty_prompt_lengths_compile_at_most_one_graph_per_bucket(tmp_path):
    hf, ours = build(transformers.OPTForCausalLM, OPTForCausalLM, opt_config(max_position_embeddings=512), tmp_path)
    lengths = list(range(20, 420, 10))
    assert len(lengths) == 40
    rng = np.random.RandomState(5)
    before = COMPILES.graphs
    for n in lengths:
        ids = rng.randint(3, VOCAB, (1, n))
        got = ours.generate(input_ids=ids, max_new_tokens=2).sequences
        assert got.shape == (1, n + 2)
        if n in (20, 230, 410):  # bucket padding changes nothing
            np.testing.assert_array_equal(got, hf_greedy(hf, ids, np.ones_like(ids), 2))
    buckets = {bucket_length(n) for n in lengths}
    compiled = COMPILES.graphs - before
    assert compiled <= 2 * len(buckets), (compiled, len(buckets))  # a prefill and a decode graph per bucket
    assert len(buckets) == 14  # 40 lengths from 20 to 410 share 14 buckets


MEMORY_SCRIPT = r"""
import json, resource, sys
import numpy as np
import transformers
from mindspore import Tensor
from models.layers import init_weights
from models.llama import LlamaForCausalLM

cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=20000)
model = LlamaForCausalLM(cfg)
init_weights(model)
length = int(sys.argv[1])
embeds = Tensor(np.random.default_rng(0).normal(size=(1, length, 64)).astype(np.float32))
model.generate(inputs_embeds=Tensor(embeds.asnumpy()[:, :64]), max_new_tokens=2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = model.generate(inputs_embeds=embeds, max_new_tokens=2)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kb": before, "after_kb": after, "tokens": int(out.sequences.shape[1])}))
"""


def test_16k_token_prefill_raises_peak_memory_by_less_than_2gb():
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, "16384"], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["tokens"] == 2
    grown_gb = (stats["after_kb"] - stats["before_kb"]) / 1024 ** 2
    assert grown_gb < 2.0, stats
