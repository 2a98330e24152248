"""Certified robust accuracy of a Lipschitz classifier from its logit margins; see docs/lipschitz.md.

If each logit is 1-Lipschitz on its own (``certificate="per_logit"``, a disjoint Frobenius
head), the difference of two logits is 2-Lipschitz, so no perturbation of L2 norm below
``(top1 − top2) / 2`` can change the prediction. If the logit *vector* is 1-Lipschitz
(``"vector"``), the difference ``(e_a − e_b)ᵀ f`` is √2-Lipschitz and the radius is
``(top1 − top2) / √2``. A network whose measured constant is ``L`` instead of 1 gets radii
divided by ``L`` (``lipschitz_constant``). Certified accuracy at ε is the fraction of samples
predicted correctly with radius ≥ ε; ε is an L2 distance in the model's input space (images
in [0, 1] for Harmonia's models, which own their normalization).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import Metric

Certificate = Literal["per_logit", "vector"]
# The Lipschitz constant of a difference of two logits under each certificate.
MARGIN_LIPSCHITZ = {"per_logit": 2.0, "vector": math.sqrt(2.0)}


def model_certificate(model: nn.Module) -> Certificate:
    """The ``certificate`` attribute of ``model``; a clear ``ValueError`` when it has none."""
    certificate = getattr(model, "certificate", None)
    if certificate is None:
        raise ValueError(
            f"{type(model).__name__} carries no Lipschitz certificate (attribute `certificate` is missing or None): "
            "certified accuracy needs a 1-Lipschitz network, e.g. the registry's 'lipschitz_cnn'"
        )
    if certificate not in MARGIN_LIPSCHITZ:
        raise ValueError(f"unknown certificate {certificate!r} on {type(model).__name__}; expected one of {sorted(MARGIN_LIPSCHITZ)}")
    return certificate


def certified_radius(logits: Tensor, certificate: Certificate, lipschitz_constant: float = 1.0) -> Tensor:
    """L2 radius ``(top1 − top2) / (c · L)`` around each input within which the prediction cannot change."""
    if certificate not in MARGIN_LIPSCHITZ:
        raise ValueError(f"unknown certificate {certificate!r}; expected one of {sorted(MARGIN_LIPSCHITZ)}")
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (N, K) with K >= 2, got shape {tuple(logits.shape)}")
    if lipschitz_constant <= 0:
        raise ValueError(f"lipschitz_constant must be positive, got {lipschitz_constant}")
    top = logits.topk(2, dim=1).values
    return (top[:, 0] - top[:, 1]) / (MARGIN_LIPSCHITZ[certificate] * lipschitz_constant)


class CertifiedAccuracy(Metric):
    """Fraction of samples correct *and* certified at each ε: ``compute()`` → ``(len(epsilons),)``.

    States are sums, reduced across processes by torchmetrics. Build it from a model with
    :meth:`for_model`, which reads (and requires) the model's ``certificate`` attribute.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, epsilons: Sequence[float], certificate: Certificate, lipschitz_constant: float = 1.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.epsilons = tuple(float(e) for e in epsilons)
        if not self.epsilons or any(e < 0 or not math.isfinite(e) for e in self.epsilons):
            raise ValueError(f"epsilons must be a non-empty list of finite values >= 0, got {list(epsilons)}")
        certified_radius(torch.zeros(1, 2), certificate, lipschitz_constant)  # validates both arguments
        self.certificate = certificate
        self.lipschitz_constant = float(lipschitz_constant)
        self.add_state("certified", default=torch.zeros(len(self.epsilons), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @classmethod
    def for_model(cls, model: nn.Module, epsilons: Sequence[float], **kwargs: Any) -> CertifiedAccuracy:
        """The metric for ``model``'s certificate; ``ValueError`` if the model has none."""
        return cls(epsilons, model_certificate(model), **kwargs)

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Accumulate a batch of logits ``(N, K)`` and integer targets ``(N,)``."""
        if target.shape != logits.shape[:1]:
            raise ValueError(f"target of shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
        logits = logits.detach().float()
        correct = logits.argmax(1) == target
        radius = certified_radius(logits, self.certificate, self.lipschitz_constant)
        eps = torch.tensor(self.epsilons, device=logits.device)
        self.certified += (correct[:, None] & (radius[:, None] >= eps[None])).sum(0)
        self.total += len(target)

    def compute(self) -> Tensor:
        """Certified accuracy at each ε (NaN before any sample was seen)."""
        return self.certified.float() / self.total.float()
