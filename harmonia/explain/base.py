"""The contract every attribution method follows, and the batched forwards they share.

One verb, as in captum: ``method.attribute(model, x, target) -> (N,1,H,W)``. ``x`` is a batch of
images ``(N,C,H,W)`` on the model's device (in [0, 1] before any normalization: Harmonia's
models own their normalization), ``target`` the class to explain per image ``(N,)``. The score
explained is the target's raw logit unless a method says otherwise, never a softmax.

Promises of every method, tested in ``tests/test_explain.py``:
- it works when called from ``torch.no_grad`` or ``torch.inference_mode`` (Lightning's
  stand-alone ``validate`` runs in inference mode): gradients are enabled locally;
- it never changes the model's train/eval mode and leaves no ``.grad`` on its parameters
  (gradients are taken w.r.t. the inputs only); explain a model in eval mode: in training mode
  dropout makes maps random and spectral-normalized layers update their power-iteration state
  on every forward, so the caller (e.g. ``SaliencyMonitor``) switches modes, not the method;
- results do not depend on ``batch_size`` (it only bounds memory), and randomized methods are
  deterministic given their ``seed``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from harmonia.explain.gradient import Score, class_score, input_gradient

Reduction = Literal["max_abs", "mean_abs", "mean", "sum"]
_REDUCERS: dict[str, Callable[[Tensor], Tensor]] = {
    "max_abs": lambda a: a.abs().amax(dim=1, keepdim=True),
    "mean_abs": lambda a: a.abs().mean(dim=1, keepdim=True),
    "mean": lambda a: a.mean(dim=1, keepdim=True),
    "sum": lambda a: a.sum(dim=1, keepdim=True),
}
REDUCTIONS: tuple[str, ...] = tuple(_REDUCERS)


def check_reduction(reduction: str) -> Reduction:
    """Return ``reduction`` if it is one of ``REDUCTIONS``; raise a clear error otherwise."""
    if reduction not in _REDUCERS:
        raise ValueError(f"unknown channel reduction {reduction!r}; use one of {REDUCTIONS}")
    return reduction  # type: ignore[return-value]


def reduce_channels(attribution: Tensor, reduction: Reduction) -> Tensor:
    """Reduce ``(N,C,H,W)`` per-channel attributions to a ``(N,1,H,W)`` map.

    ``max_abs``: Xplique's ``Saliency``; ``mean_abs``: the unsigned mean, which penalizes
    sensitivity of either sign; ``mean``: the harmonization reference's signed map and Xplique's
    default reducer; ``sum``: keeps Integrated Gradients' completeness (Σ map = f(x) − f(baseline)).
    """
    return _REDUCERS[check_reduction(reduction)](attribution)


def check_batch(x: Tensor, target: Tensor) -> Tensor:
    """Validate an ``(N,C,H,W)`` float batch and its ``(N,)`` targets; return targets as int64."""
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"inputs must be a float tensor (N,C,H,W); got {getattr(x, 'shape', type(x))}")
    target = torch.as_tensor(target, device=x.device)
    if target.ndim != 1 or len(target) != len(x):
        raise ValueError(f"target must have shape ({len(x)},), one class per image; got {tuple(target.shape)}")
    if target.is_floating_point() or (len(target) and int(target.min()) < 0):
        raise ValueError(f"target must hold non-negative class indices; got {target.tolist()[:8]}")
    return target.long()


def check_positive(**values: float) -> None:
    """Raise a clear error for any argument that must be a positive number and is not."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0; got {value}")


@contextmanager
def gradients_on() -> Iterator[None]:
    """Enable autograd even inside ``no_grad``/``inference_mode`` callers (Lightning's stand-alone ``validate``)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def chunks(total: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``batch_size`` covering ``range(total)``."""
    for start in range(0, total, batch_size):
        yield slice(start, min(start + batch_size, total))


def batched_gradients(
    model: nn.Module,
    make_inputs: Callable[[slice], tuple[Tensor, Tensor]],
    total: int,
    batch_size: int,
    score: Score = "logit",
) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(slice, ∂ score_target / ∂ inputs)`` for ``total`` inputs built chunk by chunk.

    ``make_inputs(slice)`` returns ``(inputs, targets)`` for those positions; building them per
    chunk keeps memory at ``batch_size`` inputs however many perturbations a method needs.
    """
    for part in chunks(total, batch_size):
        # Grad mode is entered per chunk, never held across a ``yield``: a context left open
        # in a suspended generator would leak into the caller's code between chunks.
        with gradients_on():
            inputs, targets = make_inputs(part)
            inputs = inputs.detach().clone().requires_grad_(True)  # clone: no inference tensors
            grad = input_gradient(model(inputs), inputs, targets, score=score)
        yield part, grad


Activation = Literal["softmax", "sigmoid"]


def batched_scores(
    model: nn.Module,
    make_inputs: Callable[[slice], tuple[Tensor, Tensor]],
    total: int,
    batch_size: int,
    activation: Activation | None = None,
) -> Tensor:
    """Target scores ``(total,)`` of inputs built chunk by chunk, without autograd.

    The score is the raw logit, or its ``softmax``/``sigmoid`` probability when ``activation``
    is set (Xplique's metrics offer the same switch). Weight parametrizations (spectral/Björck
    normalization of 1-Lipschitz layers) are computed once for all chunks
    (``parametrize.cached``): Sobol attribution and the fidelity metrics run thousands of
    forwards of the same weights.
    """
    if activation not in (None, "softmax", "sigmoid"):
        raise ValueError(f"activation must be None, 'softmax' or 'sigmoid'; got {activation!r}")
    scores = []
    with torch.no_grad(), parametrize.cached():
        for part in chunks(total, batch_size):
            inputs, targets = make_inputs(part)
            logits = model(inputs)
            if activation == "softmax":
                logits = logits.softmax(dim=-1)
            elif activation == "sigmoid":
                logits = logits.sigmoid()
            scores.append(class_score(logits, targets).float())
    if not scores:
        return torch.zeros(0)
    return torch.cat(scores)


class Explainer(ABC):
    """Base of Harmonia's attribution methods: validates inputs, then calls ``_attribute``.

    Args:
        batch_size: how many (perturbed) inputs go through the model at once; results do
            not depend on it.
    """

    def __init__(self, batch_size: int = 64) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.batch_size = int(batch_size)

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        """Attribution maps ``(N,1,H,W)`` of ``target``'s logit for the images ``x``."""
        target = check_batch(x, target)
        if len(x) == 0:
            return x.new_zeros(0, 1, *x.shape[-2:])
        # Outside inference mode, every tensor the method creates is a normal one it may
        # update in place; inference-tensor inputs are copied once.
        with torch.inference_mode(False):
            x, target = (t.clone() if t.is_inference() else t for t in (x, target))
            return self._attribute(model, x, target)

    @abstractmethod
    def _attribute(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        """Method-specific work on a validated, non-empty batch."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
