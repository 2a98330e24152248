"""Explanation and robustness metrics (torchmetrics ``Metric``s, plain PyTorch)."""

from harmonia.metrics.certified import CertifiedAccuracy, certified_radius, model_certificate

__all__ = ["CertifiedAccuracy", "certified_radius", "model_certificate"]
