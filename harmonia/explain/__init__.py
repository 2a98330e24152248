"""Attribution methods (plain PyTorch)."""

from harmonia.explain.gradient import (
    class_score,
    gradient_saliency,
    harmonization_saliency,
    input_gradient,
)

__all__ = ["class_score", "gradient_saliency", "harmonization_saliency", "input_gradient"]
