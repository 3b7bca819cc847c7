"""One sparse mixture-of-experts layer for every MoE decoder (Qwen3-VL-MoE, Qwen3-MoE, Qwen3.5-MoE), and its expert
tensors.

Routing: a linear router (``gate.weight``, no bias) gives each token a softmax over the experts (float32),
the top ``num_experts_per_tok`` are kept and, with ``norm_topk_prob`` (Qwen3-VL-MoE always), renormalised
to sum to 1. A token's output is the weighted sum of its experts' SwiGLU MLPs, plus, where the config has one,
a shared expert's output scaled by its own sigmoid gate (Qwen3.5-MoE).

Experts are two 3-D tensors in the published Qwen3-VL-MoE layout, ``experts.gate_up_proj`` (E, hidden,
2 x inter: gate columns, then up) and ``experts.down_proj`` (E, inter, hidden), so a group of tokens
multiplies them without a transpose. :func:`adapt_expert_tensors` maps the other layouts onto it: the
transposed one transformers 5's ``save_pretrained`` writes, and per-expert ``experts.N.{gate,up,down}_proj.weight``
matrices (Qwen3-MoE, and the FP8 releases).

How the experts run (:func:`run_experts`), never as a Python loop over experts:

- Ascend: MindSpore's ``moe_token_permute``, ``grouped_matmul_v4`` (one grouped matmul per projection over
  the tokens sorted by expert) and ``moe_token_unpermute``; static shapes, so it compiles. Not run here
  (no NPU on the development machine).
- CPU, one-token steps (T = 1, what generation compiles, so shapes must be static): the fused kernel
  ``models/kernels/moe.cc`` (float32), which groups the pairs by expert and reads each picked expert's
  matrices once, in place. Without it (``CAPTION_KERNELS=0``, other dtypes): with no more (token, expert)
  pairs than experts, each pair gathers its expert's matrices and one batched matmul runs every pair; with
  more, every expert runs on every token and the routing weights (zero where not picked) combine them, which
  reads each expert once.
- CPU, longer inputs (prompts, which an MoE model runs op by op: ``compile_prompt = False``): the pairs
  are sorted by expert on the host, each expert's tokens padded to the largest group, and one batched matmul
  per projection runs the experts (only those that got tokens, when few did); the routing and that device
  part are each one graph compiled for every token count (``dynamic``): op by op, their slices and
  elementwise ops cost more than the matmuls on CPU (2.3x faster at 512 to 4096 tokens).

Expert parallelism: inside ``models.parallel.building`` a group of ``size`` ranks splits the experts evenly
(rank r keeps experts [r E / size, (r + 1) E / size)), and the loader reads only those (``checkpoint_slices``
on the expert axis). The router is whole on every rank; each rank adds its experts' share of every token and
an all-reduce sums the shares. Attention and dense MLPs stay tensor-parallel over the same group, so a
node's devices hold one copy of the model between them.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from models import attention, kernels
from models.layers import Linear, silu_mul, zeros_parameter
from models.parallel import current

_matmul_t = ops.MatMul(transpose_b=True)
_bmm = ops.BatchMatMul()


def num_experts(config) -> int:
    """The config's expert count (transformers 5 aliases ``num_experts`` to ``num_local_experts``); 0: dense."""
    return int(getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0)


def is_sparse_layer(config, index: int) -> bool:
    """Whether decoder layer ``index`` has experts: not in ``mlp_only_layers`` and every ``decoder_sparse_step``-th."""
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return (num_experts(config) > 0 and index not in (getattr(config, "mlp_only_layers", None) or ())
            and (index + 1) % step == 0)


def _on_ascend() -> bool:
    return attention.device() == "Ascend"  # read before each compile: graphs cannot ask MindSpore


class Experts(nn.Cell):
    """This rank's experts: ``gate_up_proj`` (E_local, hidden, 2 inter) and ``down_proj`` (E_local, inter, hidden)."""

    def __init__(self, total: int, hidden: int, inter: int):
        super().__init__()
        first, stop = current().split(total, "num_experts")
        self.first, self.count, self.total, self.inter = first, stop - first, total, inter
        self.gate_up_proj = zeros_parameter((self.count, hidden, 2 * inter))
        self.down_proj = zeros_parameter((self.count, inter, hidden))
        if self.count != total:
            self.checkpoint_slices = {"gate_up_proj": (0, first, stop, total), "down_proj": (0, first, stop, total)}


class SparseMoeBlock(nn.Cell):
    """The MoE MLP of a decoder layer: ``gate`` (the router) and ``experts``; (B, T, hidden) in and out.

    ``shared_expert``: a dense MLP every token also goes through, weighted by sigmoid(``shared_expert_gate`` x), a
    scalar per token (Qwen3.5-MoE). It is added after the ranks' expert shares are summed: a tensor-parallel
    MLP completes its own output."""

    def __init__(self, config, shared_expert: Optional[nn.Cell] = None):
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"MoE experts support hidden_act='silu', got {config.hidden_act!r}")
        total = num_experts(config)
        self.top_k = int(config.num_experts_per_tok)
        if not 0 < self.top_k <= total:
            raise ValueError(f"num_experts_per_tok ({self.top_k}) must be between 1 and num_experts ({total})")
        self.normalise = bool(getattr(config, "norm_topk_prob", True))
        self.gate = Linear(config.hidden_size, total, bias=False)
        self.experts = Experts(total, config.hidden_size, config.moe_intermediate_size)
        self.reduce = current().reducer()
        self.shared_expert = shared_expert
        self.shared_expert_gate = None if shared_expert is None else Linear(config.hidden_size, 1, bias=False)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, hidden) tokens -> their experts (N, k) int32 and routing weights (N, k) in x's dtype."""
        return _route(x, self.gate.weight, self.top_k, self.normalise)

    def construct(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        # a prompt on CPU runs op by op (see run_experts): its routing is compiled once for every length
        if t == 1 or _on_ascend():
            ids, weights = self.route(flat)
        else:
            ids, weights = _route_prompt(flat, self.gate.weight, self.top_k, self.normalise)
        out = run_experts(flat, ids, weights, self.experts, one_step=t == 1)
        if self.reduce is not None:
            out = self.reduce(out)
        if self.shared_expert is not None:
            out = out + ops.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(b, t, d)


def _route(x: Tensor, gate: Tensor, top_k: int, normalise: bool) -> tuple[Tensor, Tensor]:
    """Softmax over the experts (float32), the top ``top_k``, renormalised with ``normalise``."""
    probs = ops.softmax(_matmul_t(x, gate.astype(x.dtype)).astype(ms.float32), axis=-1)
    weights, ids = ops.topk(probs, top_k)
    if normalise:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return ids.astype(ms.int32), weights.astype(x.dtype)


def _route_once(x: Tensor, gate: Tensor, top_k: int, normalise: bool) -> tuple[Tensor, Tensor]:
    """:func:`_route` as a function of its own to compile, so ``_route`` stays plain inside the decode graphs."""
    return _route(x, gate, top_k, normalise)


# a prompt's routing, compiled once for every length (jitting the bound method would make the decode graphs'
# inputs dynamic)
_route_prompt = ms.jit(_route_once, dynamic=1)


def _local(ids: Tensor, weights: Tensor, experts: Experts) -> tuple[Tensor, Tensor]:
    """Routing in this rank's expert numbering: other ranks' experts point at expert 0 with weight 0."""
    local = ids - experts.first
    mine = ops.logical_and(local >= 0, local < experts.count)
    return ops.where(mine, local, ops.zeros_like(local)), ops.where(mine, weights, ops.zeros_like(weights))


def _swiglu_bmm(tokens: Tensor, gate_up: Tensor, down: Tensor, inter: int) -> Tensor:
    """(G, M, hidden) tokens through G experts' MLPs -> (G, M, hidden)."""
    hidden = _bmm(tokens, gate_up)
    return _bmm(silu_mul(hidden[..., :inter], hidden[..., inter:]), down)


def _pairs_gathered(x: Tensor, ids: Tensor, weights: Tensor, experts: Experts) -> Tensor:
    """Each (token, expert) pair with its expert's matrices gathered: reads only the picked experts."""
    n, k = ids.shape
    pairs = ids.reshape(-1)
    tokens = ops.gather(x, ops.arange(n * k, dtype=ms.int32) // k, 0)[:, None]
    out = _swiglu_bmm(tokens, ops.gather(experts.gate_up_proj, pairs, 0), ops.gather(experts.down_proj, pairs, 0),
                      experts.inter)
    return (out[:, 0].reshape(n, k, -1) * weights[..., None]).sum(axis=1)


def _all_experts(x: Tensor, ids: Tensor, weights: Tensor, experts: Experts) -> Tensor:
    """Every expert on every token, combined by the routing weights (zero where not picked)."""
    n, _ = ids.shape
    dense = (ops.one_hot(ids, experts.count, Tensor(1, x.dtype), Tensor(0, x.dtype)) * weights[..., None]).sum(axis=1)
    tokens = ops.broadcast_to(x[None], (experts.count,) + x.shape)
    out = _swiglu_bmm(tokens, experts.gate_up_proj, experts.down_proj, experts.inter)
    return (out * dense.swapaxes(0, 1)[..., None]).sum(axis=0)


def _grouped_compute(x: Tensor, rows: Tensor, gate_up: Tensor, down: Tensor, slot: Tensor, weights: Tensor,
                     inter: int) -> Tensor:
    """The device part of the host-grouped path: ``rows`` (G, W) the token of each group slot, ``slot`` (N, k)
    each pair's row among the G x W outputs; the routing-weighted sum of a token's k rows is one batched matmul."""
    out = _swiglu_bmm(ops.gather(x, rows, 0), gate_up, down, inter)
    picked = ops.gather(out.reshape(-1, out.shape[-1]), slot, 0)
    return _bmm(weights[:, None, :], picked)[:, 0]


# compiled once for every token count and group width (op by op, the slices and elementwise ops cost more
# than the two matmuls on CPU)
_grouped_compute_jit = ms.jit(_grouped_compute, dynamic=1)


def _grouped_on_host(x: Tensor, ids: Tensor, weights: Tensor, experts: Experts) -> Tensor:
    """Pairs sorted by expert on the host (other ranks' experts left out); one batched matmul per projection
    over the experts (those that got tokens, when few did), each expert's tokens padded to the largest group."""
    n, k = ids.shape
    pair_expert = ids.asnumpy().reshape(-1) - experts.first
    mine = (pair_expert >= 0) & (pair_expert < experts.count)
    if not mine.any():
        return ops.zeros_like(x)
    counts = np.bincount(pair_expert[mine], minlength=experts.count)
    width = int(counts.max())
    # the experts that got tokens, when they are few (copying them costs about 3 reads of one); else all
    # experts, those without tokens on padding rows (reading every expert once costs less than the copies)
    hit = np.flatnonzero(counts)
    groups = hit if 3 * len(hit) < experts.count else np.arange(experts.count)
    order = np.flatnonzero(mine)[np.argsort(pair_expert[mine], kind="stable")]
    rank_in_group = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    slot = np.zeros(n * k, np.int32)  # pairs of other ranks read row 0, with weight 0
    slot[order] = np.searchsorted(groups, pair_expert[order]) * width + rank_in_group
    token_of_row = np.zeros(len(groups) * width, np.int32)
    token_of_row[slot[order]] = order // k
    if not mine.all():
        weights = weights * Tensor(mine.reshape(n, k).astype(np.float32)).astype(weights.dtype)
    if len(groups) == experts.count:
        gate_up, down = experts.gate_up_proj, experts.down_proj
    else:
        chosen = Tensor(groups.astype(np.int32))
        gate_up, down = ops.gather(experts.gate_up_proj, chosen, 0), ops.gather(experts.down_proj, chosen, 0)
    return _grouped_compute_jit(x, Tensor(token_of_row.reshape(len(groups), width)), gate_up, down,
                                Tensor(slot.reshape(n, k)), weights, experts.inter)


def _grouped_ascend(x: Tensor, ids: Tensor, weights: Tensor, experts: Experts) -> Tensor:
    """Ascend's grouped matmul over the tokens sorted by expert (static shapes). Not run on the development
    machine, which has no NPU."""
    from mindspore.ops.auto_generate import grouped_matmul_v4

    tokens, order = ops.moe_token_permute(x, ids)
    counts = ops.one_hot(ids.reshape(-1), experts.count, Tensor(1, ms.int32), Tensor(0, ms.int32)).sum(axis=0)
    counts = counts.astype(ms.int64)

    def grouped(inputs: Tensor, weight: Tensor) -> Tensor:
        return grouped_matmul_v4([inputs], [weight], group_list=counts, split_item=3, group_type=0,
                                 group_list_type=1)[0]

    hidden = grouped(tokens, experts.gate_up_proj)
    rows = grouped(silu_mul(hidden[:, :experts.inter], hidden[:, experts.inter:]), experts.down_proj)
    return ops.moe_token_unpermute(rows, order, weights)


def run_experts(x: Tensor, ids: Tensor, weights: Tensor, experts: Experts, one_step: bool) -> Tensor:
    """This rank's experts' share of each token's output: ``x`` (N, hidden), ``ids``/``weights`` (N, k) global
    expert numbers and routing weights; ``one_step``: a compiled one-token step (static shapes only)."""
    if not one_step and not _on_ascend():
        return _grouped_on_host(x, ids, weights, experts)
    ids, weights = _local(ids, weights, experts)
    if _on_ascend():
        return _grouped_ascend(x, ids, weights, experts)
    if kernels.runs_on(x) and x.shape[1] % 8 == 0 and experts.inter % 4 == 0 \
            and experts.gate_up_proj.dtype == ms.float32:
        return kernels.op("moe_experts")(x, ids.astype(ms.float32), weights, experts.gate_up_proj, experts.down_proj)
    if ids.size <= experts.count:
        return _pairs_gathered(x, ids, weights, experts)
    return _all_experts(x, ids, weights, experts)


# --- expert tensors in the checkpoint layouts users download


_FUSED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _stacked(refs: list, combine: Callable[[list[np.ndarray]], np.ndarray], shape: tuple[int, ...]):
    """A lazy tensor of one entry per expert, built from ``refs[e]`` (a list per expert); a slice along the
    expert axis reads only those experts."""
    from models.checkpoint import TensorRef

    def read_part(index: tuple = ()) -> np.ndarray:
        dim = len(index) - 1 if index else -1
        picked = range(len(refs))[index[0]] if dim == 0 else range(len(refs))
        out = np.stack([combine([ref.read() for ref in refs[e]]) for e in picked])
        return out[index] if dim > 0 else out

    return TensorRef(shape, read_part, read_part)


def _transposed(ref):
    """A lazy (E, a, b) -> (E, b, a) view; a slice along the expert axis reads only those experts."""
    from models.checkpoint import TensorRef

    def read_part(index: tuple = ()) -> np.ndarray:
        if len(index) == 1:
            return np.ascontiguousarray(ref.part(0, index[0].start, index[0].stop).transpose(0, 2, 1))
        return np.ascontiguousarray(ref.read().transpose(0, 2, 1))[index]

    e, a, b = ref.shape
    return TensorRef((e, b, a), read_part, read_part)


def adapt_expert_tensors(tensors: dict, hidden: int, inter: int, saved_by_transformers_5: bool) -> None:
    """Rewrite ``tensors`` ({name: TensorRef}) in place so every layer's experts are the two fused tensors of
    :class:`Experts`: per-expert matrices are stacked (and gate/up concatenated), and fused tensors stored
    transposed are flipped. Fused tensors are told apart by shape; when both layouts have the same shape
    (hidden = 2 inter, or inter = hidden) the writer decides: transformers 5's ``save_pretrained`` stores them
    transposed (``saved_by_transformers_5``), the published checkpoints do not."""
    per_expert: dict[str, dict[int, dict[str, object]]] = {}
    for name in list(tensors):
        match = _PER_EXPERT.match(name)
        if match:
            prefix, index, proj = match.groups()
            per_expert.setdefault(prefix, {}).setdefault(int(index), {})[proj] = tensors.pop(name)
    for prefix, experts in per_expert.items():
        count = max(experts) + 1
        missing = [f"{prefix}.{e}.{p}.weight" for e in range(count) for p in ("gate_proj", "up_proj", "down_proj")
                   if p not in experts.get(e, {})]
        if missing:
            from models.checkpoint import CheckpointError

            raise CheckpointError(f"expert matrices missing from the checkpoint: {', '.join(missing[:10])}"
                                  + (", ..." if len(missing) > 10 else ""))
        gate_up = [[experts[e]["gate_proj"], experts[e]["up_proj"]] for e in range(count)]
        down = [[experts[e]["down_proj"]] for e in range(count)]
        tensors[f"{prefix}.gate_up_proj"] = _stacked(
            gate_up, lambda parts: np.concatenate(parts, axis=0).T, (count, hidden, 2 * inter))
        tensors[f"{prefix}.down_proj"] = _stacked(down, lambda parts: parts[0].T, (count, inter, hidden))
    for name in list(tensors):
        match = _FUSED.match(name)
        if not match or match.group(1) in per_expert:
            continue
        ours = (hidden, 2 * inter) if match.group(2) == "gate_up_proj" else (inter, hidden)
        stored = tuple(tensors[name].shape[1:])
        flipped = stored == ours[::-1] and (stored != ours or saved_by_transformers_5)
        if flipped:
            tensors[name] = _transposed(tensors[name])


def written_by_transformers_5(config) -> bool:
    """Whether config.json was written by transformers 5 (its ``transformers_version``)."""
    version = str(getattr(config, "transformers_version", None) or "0")
    return int(re.match(r"\d*", version).group() or 0) >= 5


def expert_checkpoint_hook(model: nn.Cell, tensors: dict, text_config) -> None:
    """A model's ``checkpoint_hook`` body for a decoder that may have experts (nothing to do without them)."""
    if num_experts(text_config):
        adapt_expert_tensors(tensors, text_config.hidden_size, text_config.moe_intermediate_size,
                             written_by_transformers_5(getattr(model, "config", text_config)))


def mlp_for(config, index: int, mlp: Callable[..., nn.Cell]) -> nn.Cell:
    """Decoder layer ``index``'s MLP: a :class:`SparseMoeBlock` where the config puts experts, else ``mlp()`` (the
    model's dense MLP). ``mlp(size)`` builds one with ``size`` inner features: the experts' shared expert, where the
    config has one (``shared_expert_intermediate_size``, Qwen3.5-MoE)."""
    if not is_sparse_layer(config, index):
        return mlp()
    shared = int(getattr(config, "shared_expert_intermediate_size", None) or 0)
    return SparseMoeBlock(config, mlp(shared) if shared else None)

