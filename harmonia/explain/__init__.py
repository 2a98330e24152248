"""Attribution methods (plain PyTorch): ``method.attribute(model, x, target) -> (N,1,H,W)``."""

from harmonia.explain.base import Explainer, reduce_channels
from harmonia.explain.gradient import class_score, input_gradient
from harmonia.explain.integrated_gradients import IntegratedGradients
from harmonia.explain.registry import EXPLAINERS, build_explainer, list_explainers
from harmonia.explain.saliency import Saliency, SmoothGrad
from harmonia.explain.sobol import SobolAttribution

__all__ = [
    "EXPLAINERS",
    "Explainer",
    "IntegratedGradients",
    "Saliency",
    "SmoothGrad",
    "SobolAttribution",
    "build_explainer",
    "class_score",
    "input_gradient",
    "list_explainers",
    "reduce_channels",
]
