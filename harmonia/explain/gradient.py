"""Input-gradient saliency: the map the harmonization loss trains and the monitors score.

Two readings of the same gradient ``∂ logit_y / ∂x``:
- ``harmonization_saliency``: signed mean over channels (SPEC §1, what the reference trains);
- ``gradient_saliency``: max over channels of |gradient| (SPEC §3, Xplique ``Saliency``).
The attribution methods (``Saliency``, ``SmoothGrad``, ``IntegratedGradients``) are built on
``input_gradient`` below.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

Score = Literal["logit", "log_prob"]


def class_score(logits: Tensor, target: Tensor, score: Score = "logit") -> Tensor:
    """Per-sample score of the target class, shape ``(N,)``.

    ``"logit"``: the raw logit (the reference, not a softmax); ``"log_prob"``: its log-softmax
    ``logit_y - logsumexp(logits)``, whose input gradient also carries every *other* class's
    logit, through which a model can read a shortcut the true logit's gradient does not show.
    """
    if score == "log_prob":
        logits = logits.log_softmax(dim=-1)
    elif score != "logit":
        raise ValueError(f"score must be 'logit' or 'log_prob'; got {score!r}")
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
    backward), which is what the harmonization loss needs. ``retain_graph`` keeps the forward
    graph for a second gradient of the same logits.
    """
    (grad,) = torch.autograd.grad(
        class_score(logits, target, score).sum(), inputs, create_graph=create_graph, retain_graph=retain_graph
    )
    return grad


def harmonization_saliency(
    model: nn.Module, inputs: Tensor, target: Tensor, create_graph: bool = True
) -> tuple[Tensor, Tensor]:
    """Forward ``inputs`` and return ``(logits, saliency (N,1,H,W))`` as the reference computes it.

    The saliency is the signed channel mean of the input gradient of the target logit.
    Works inside ``no_grad``/``inference_mode`` callers too: grad mode is forced on locally.
    """
    with torch.inference_mode(False), torch.enable_grad():
        inputs = inputs.detach().clone().requires_grad_(True)
        logits = model(inputs)
        grad = input_gradient(logits, inputs, target, create_graph=create_graph)
    return logits, grad.mean(dim=1, keepdim=True)


def gradient_saliency(model: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
    """Xplique-style saliency: max over channels of ``|∂ logit_y / ∂x|``, shape ``(N,1,H,W)``.

    Shorthand for ``harmonia.explain.Saliency("max_abs").attribute(model, inputs, target)``.
    """
    from harmonia.explain.saliency import Saliency  # local: saliency.py builds on this module

    return Saliency("max_abs", batch_size=max(1, len(inputs))).attribute(model, inputs, target)
