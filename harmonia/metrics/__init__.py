"""Explanation and robustness metrics as torchmetrics ``Metric``s (plain PyTorch; sum states reduce under DDP).

    build_metric("deletion", steps=10)   # → Deletion(...)
"""

from __future__ import annotations

from typing import Any

from harmonia.registry import construct
from harmonia.metrics.alignment import HUMAN_CEILING, HumanAlignment, human_alignment
from harmonia.metrics.base import ExplanationMetric
from harmonia.metrics.certified import CertifiedAccuracy, certified_radius, model_certificate
from harmonia.metrics.correlation import spearman_rows
from harmonia.metrics.fidelity import CausalFidelity, Deletion, Insertion, MuFidelity
from harmonia.metrics.stability import AverageStability

METRICS: dict[str, type[ExplanationMetric]] = {
    "alignment": HumanAlignment,
    "deletion": Deletion,
    "insertion": Insertion,
    "mufidelity": MuFidelity,
    "stability": AverageStability,
}


def build_metric(name: str, **kwargs: Any) -> ExplanationMetric:
    """Construct the metric registered as ``name`` with its keyword arguments."""
    return construct(METRICS, "explanation metric", name, kwargs)


__all__ = [
    "AverageStability",
    "CausalFidelity",
    "CertifiedAccuracy",
    "Deletion",
    "ExplanationMetric",
    "HUMAN_CEILING",
    "HumanAlignment",
    "Insertion",
    "METRICS",
    "MuFidelity",
    "build_metric",
    "certified_radius",
    "human_alignment",
    "model_certificate",
    "spearman_rows",
]
