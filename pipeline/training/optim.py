"""AdamW, the warmup + cosine learning-rate schedule and global-norm clipping (applied inside the update).

Our own AdamW rather than ``nn.AdamWeightDecay`` because that one has no bias
correction (torch's AdamW, which the recipe was tuned with, has), and because its
moments must be saved and restored by name for an exact ``--resume``. The update of
all parameters is one compiled graph (``ms.jit``); it falls back to PyNative if
compiling fails.
"""
from __future__ import annotations

import logging
import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

logger = logging.getLogger(__name__)


def lr_at(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          warmup_start_lr: float = 0.0) -> float:
    """Linear warmup from ``warmup_start_lr`` to ``base_lr``, then cosine decay to ``min_lr`` at ``total_steps``.

    ``step`` counts optimizer updates already done (0 for the first update).
    """
    if step < warmup_steps:
        return warmup_start_lr + (base_lr - warmup_start_lr) * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def decays(name: str, param: Parameter) -> bool:
    """Weight decay on weight matrices and embeddings only, not on biases or norm scales (as LAVIS)."""
    return len(param.shape) >= 2 and "norm" not in name.lower() and not name.endswith(".bias")


@ms.jit
def _square_sums(grads):
    return ops.stack([ops.square(g.astype(ms.float32)).sum() for g in grads])


def global_norm(grads: tuple[Tensor, ...]) -> float:
    """L2 norm of all gradients together: one compiled graph (a few hundred eager ops cost more than
    a tiny model's backward on CPU) and one device-to-host copy."""
    squares = _square_sums(ms.mutable(tuple(grads)))
    return float(np.sqrt(squares.asnumpy().astype(np.float64).sum()))


def clip_scale(grads: tuple[Tensor, ...], max_norm: float) -> tuple[float, float]:
    """The factor that brings the gradients' global L2 norm down to ``max_norm`` (1.0 when it is below,
    or when ``max_norm`` <= 0), and the norm. :meth:`AdamW.step` applies the factor inside its graph."""
    norm = global_norm(grads)
    if max_norm > 0 and norm > max_norm:
        return max_norm / (norm + 1e-6), norm
    return 1.0, norm


class AdamW(nn.Cell):
    """Decoupled weight decay Adam (torch.optim.AdamW semantics) over named float32 parameters."""

    def __init__(self, named_params: list[tuple[str, Parameter]], weight_decay: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, use_jit: bool = True):
        super().__init__(auto_prefix=False)
        self.names = [n for n, _ in named_params]
        self.params = ParameterTuple([p for _, p in named_params])
        self.exp_avg = ParameterTuple([Parameter(ops.zeros(p.shape, ms.float32), name=f"exp_avg.{n}")
                                       for n, p in named_params])
        self.exp_avg_sq = ParameterTuple([Parameter(ops.zeros(p.shape, ms.float32), name=f"exp_avg_sq.{n}")
                                          for n, p in named_params])
        self.weight_decay = tuple(weight_decay if decays(n, p) else 0.0 for n, p in named_params)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.step_count = 0
        self._compiled = ms.jit(self.construct)
        self._use_jit = use_jit

    def construct(self, grads, lr, bias1, bias2, grad_scale):
        b1, b2 = self.beta1, self.beta2
        for p, m, v, g, wd in zip(self.params, self.exp_avg, self.exp_avg_sq, grads, self.weight_decay):
            g = g.astype(ms.float32) * grad_scale
            m_new = b1 * m + (1.0 - b1) * g
            v_new = b2 * v + (1.0 - b2) * g * g
            ops.assign(m, m_new)
            ops.assign(v, v_new)
            update = (m_new / bias1) / (ops.sqrt(v_new / bias2) + self.eps)
            ops.assign(p, p * (1.0 - lr * wd) - lr * update)
        return lr

    def step(self, grads: tuple[Tensor, ...], lr: float, grad_scale: float = 1.0) -> None:
        """Apply one update with learning rate ``lr`` to the gradients times ``grad_scale`` (clipping)."""
        self.step_count += 1
        args = (ms.mutable(tuple(grads)), Tensor(lr, ms.float32),
                Tensor(1.0 - self.beta1 ** self.step_count, ms.float32),
                Tensor(1.0 - self.beta2 ** self.step_count, ms.float32), Tensor(grad_scale, ms.float32))
        if self._use_jit:
            try:
                self._compiled(*args)
                return
            except (RuntimeError, TypeError, ValueError) as exc:  # compile failure: same maths eagerly
                logger.warning("AdamW update does not compile (%s); running it in PyNative", exc)
                self._use_jit = False
        self.construct(*args)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Moments by name, for checkpoints."""
        out = {p.name: p.asnumpy() for p in self.exp_avg}
        out.update({p.name: p.asnumpy() for p in self.exp_avg_sq})
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray], step_count: int) -> None:
        missing = [p.name for p in (*self.exp_avg, *self.exp_avg_sq) if p.name not in arrays]
        if missing:
            raise KeyError(f"optimizer state lacks {len(missing)} entries, e.g. {missing[:3]}")
        for p in (*self.exp_avg, *self.exp_avg_sq):
            ops.assign(p, Tensor(arrays[p.name], ms.float32))
        self.step_count = step_count
