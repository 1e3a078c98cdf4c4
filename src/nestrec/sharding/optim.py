"""Row-wise sparse optimizers: the update of one table shard, applied to the rows a batch touched.

The state (Adagrad's accumulator, Adam's moments) has the rows' shape and lives with them in the
shard, so it is sharded, checkpointed and (in the pipelines) double-buffered exactly like the
weights. Each update gets the *summed* gradient of every distinct row in the batch, once per
batch — the semantics of a fused TBE kernel, and what ``torch.optim.SGD`` / ``Adagrad`` on a dense
``nn.Embedding`` and ``torch.optim.SparseAdam`` (lazy Adam) compute, which is how the tests check it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nestrec.errors import ConfigError

__all__ = ["RowWiseOptimizer", "RowWiseSGD", "RowWiseAdagrad", "RowWiseAdam", "build_row_optimizer"]


class RowWiseOptimizer:
    """Base: ``state_names`` lists per-row state tensors; ``update`` returns new rows and state."""

    state_names: tuple[str, ...] = ()

    def init_state(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(rows)

    def update(
        self, rows: torch.Tensor, state: dict[str, torch.Tensor], grad: torch.Tensor, step: int
    ) -> None:
        """Update ``rows`` and ``state`` (gathered copies of the touched rows) in place."""
        raise NotImplementedError

    def gradient_multiplier(self) -> float | None:
        """``m`` when the step is ``rows += m * grad`` with no state (SGD), else ``None``.

        Such a step is linear in the gradient, so the data plane may add each arriving gradient
        straight into the shard instead of summing first (the same parameters up to float
        summation order); stateful steps need the summed gradient and take ``update``.
        """
        return None

    def update_in_place(
        self,
        weight: torch.Tensor,
        state: dict[str, torch.Tensor],
        index: torch.Tensor,
        grad: torch.Tensor,
        step: int,
    ) -> None:
        """The same step applied to rows ``index`` of a whole shard (``weight`` and its ``state``).

        Gather, :meth:`update`, scatter back; an optimizer without state can do it in one op.
        """
        rows = weight.index_select(0, index)
        gathered = {k: v.index_select(0, index) for k, v in state.items()}
        self.update(rows, gathered, grad.to(rows.dtype), step)
        weight.index_copy_(0, index, rows)
        for name, values in gathered.items():
            state[name].index_copy_(0, index, values)


@dataclass
class RowWiseSGD(RowWiseOptimizer):
    lr: float = 0.01

    def update(self, rows, state, grad, step) -> None:
        rows.add_(grad, alpha=-self.lr)

    def gradient_multiplier(self) -> float | None:
        # A subclass that changes the step (weight decay, clipping) is not plain SGD any more.
        cls = type(self)
        if cls.update is not RowWiseSGD.update or cls.update_in_place is not RowWiseSGD.update_in_place:
            return None
        return -self.lr

    def update_in_place(self, weight, state, index, grad, step) -> None:
        # One scatter-add (keys are unique). Scaling first: index_add_ with alpha is ~4x slower on CPU.
        weight.index_add_(0, index, grad.to(weight.dtype) * -self.lr)


@dataclass
class RowWiseAdagrad(RowWiseOptimizer):
    """``torch.optim.Adagrad`` maths (lr_decay = 0, weight_decay = 0)."""

    lr: float = 0.01
    eps: float = 1e-10
    initial_accumulator_value: float = 0.0
    state_names = ("sum",)

    def init_state(self, name, rows):
        return torch.full_like(rows, self.initial_accumulator_value)

    def update(self, rows, state, grad, step) -> None:
        state["sum"].addcmul_(grad, grad)
        rows.addcdiv_(grad, state["sum"].sqrt().add_(self.eps), value=-self.lr)


@dataclass
class RowWiseAdam(RowWiseOptimizer):
    """Lazy Adam, as ``torch.optim.SparseAdam``: only touched rows move; bias correction uses the
    table's step count (one step per batch)."""

    lr: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    state_names = ("exp_avg", "exp_avg_sq")

    def update(self, rows, state, grad, step) -> None:
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(self.beta1).add_(grad, alpha=1 - self.beta1)
        v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        correction1 = 1 - self.beta1**step
        correction2 = 1 - self.beta2**step
        step_size = self.lr * math.sqrt(correction2) / correction1
        rows.addcdiv_(m, v.sqrt().add_(self.eps), value=-step_size)


_OPTIMIZERS = {"sgd": RowWiseSGD, "adagrad": RowWiseAdagrad, "adam": RowWiseAdam}


def build_row_optimizer(name: str, **kwargs) -> RowWiseOptimizer:
    """``sgd`` / ``adagrad`` / ``adam`` with their keyword arguments (from config)."""
    if name not in _OPTIMIZERS:
        raise ConfigError(f"unknown sparse optimizer {name!r}; expected one of {', '.join(_OPTIMIZERS)}")
    try:
        return _OPTIMIZERS[name](**kwargs)
    except TypeError as err:
        raise ConfigError(f"sparse optimizer {name!r}: {err}") from None
