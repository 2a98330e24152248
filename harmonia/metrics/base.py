"""What Harmonia's explanation metrics share: sum states and one way of naming their inputs.

Every metric is a ``torchmetrics.Metric`` whose states are sums (``dist_reduce_fx="sum"``), so
under DDP ``compute()`` reduces them across processes by itself and the result equals a single
process scoring the union of the shards. Each metric lists the keyword inputs its ``update``
takes in ``needs`` (a subset of ``model``, ``inputs``, ``targets``, ``explanations``,
``explainer``, ``human_maps``, ``has_map``) so a caller such as ``SaliencyMonitor`` can feed
any metric without knowing it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric

INPUT_NAMES = ("model", "inputs", "targets", "explanations", "explainer", "human_maps", "has_map")


class ExplanationMetric(Metric):
    """A ``Metric`` over explanations; ``needs`` names the keyword inputs of ``update``."""

    needs: ClassVar[tuple[str, ...]] = ()
    full_state_update = False
    is_differentiable = False


class SampleMean(ExplanationMetric):
    """A metric that is the mean of one value per image: sum and count states (float64)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def add(self, values: Tensor) -> None:
        """Add per-image values ``(N,)``."""
        self.total += values.double().sum().to(self.total)
        self.count += len(values)

    def compute(self) -> Tensor:
        """Mean over images; NaN when nothing was scored (nothing was measured, not zero)."""
        if self.count == 0:
            return torch.tensor(float("nan"))
        return (self.total / self.count).float()


def as_map(explanations: Tensor, size: tuple[int, int], what: str = "explanations") -> Tensor:
    """``(N,1,H,W)`` float maps from ``(N,H,W)`` or ``(N,C,H,W)`` (channels averaged, as Xplique).

    Raises when the spatial size differs from ``size`` or values are not finite.
    """
    if explanations.ndim == 3:
        explanations = explanations[:, None]
    if explanations.ndim != 4:
        raise ValueError(f"{what} must be (N,H,W) or (N,C,H,W); got {tuple(explanations.shape)}")
    if tuple(explanations.shape[-2:]) != tuple(size):
        raise ValueError(f"{what} are {tuple(explanations.shape[-2:])} but the images are {tuple(size)}")
    explanations = explanations.float()
    if explanations.shape[1] != 1:
        explanations = explanations.mean(dim=1, keepdim=True)
    if not torch.isfinite(explanations).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return explanations
