"""The score an input gradient differentiates, and the gradient itself.

Every gradient-based method (``Saliency``, ``SmoothGrad``, ``IntegratedGradients``) and every
training penalty reads ``∂ score / ∂x`` through these two functions, so "the gradient of the
target's logit" means one thing everywhere.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Score = Literal["logit", "log_prob"]
SCORES: tuple[str, ...] = ("logit", "log_prob")


def class_score(logits: Tensor, target: Tensor, score: Score = "logit") -> Tensor:
    """Per-sample score of the target class, shape ``(N,)``.

    ``"logit"``: the raw logit (what the harmonization reference differentiates, not a
    softmax); ``"log_prob"``: its log-softmax ``logit_y - logsumexp(logits)``, whose input
    gradient also carries every *other* class's logit, through which a model can read a
    shortcut that the true logit's gradient does not show.
    """
    if score == "log_prob":
        logits = logits.log_softmax(dim=-1)
    elif score != "logit":
        raise ValueError(f"score must be one of {SCORES}; got {score!r}")
    return logits.gather(1, target.long().view(-1, 1)).squeeze(1)


def input_gradient(
    logits: Tensor,
    inputs: Tensor,
    target: Tensor,
    create_graph: bool = False,
    score: Score = "logit",
    retain_graph: bool | None = None,
) -> Tensor:
    """``∂ Σ_n score_{n, y_n} / ∂ inputs`` for logits already computed from ``inputs``.

    With ``create_graph=True`` the result stays differentiable w.r.t. the parameters (double
    backward), which a training penalty needs. ``retain_graph`` keeps the forward graph for a
    second gradient of the same logits.
    """
    (grad,) = torch.autograd.grad(
        class_score(logits, target, score).sum(), inputs, create_graph=create_graph, retain_graph=retain_graph
    )
    return grad
