"""Attribution methods by name, so callbacks and YAML configs can name them.

    build_explainer("sobol", grid_size=8, nb_design=16)   # → SobolAttribution(...)
    list_explainers()                                      # → {"saliency": "...", ...}
"""

from __future__ import annotations

from typing import Any

from harmonia.explain.base import Explainer
from harmonia.explain.integrated_gradients import IntegratedGradients
from harmonia.explain.saliency import Saliency, SmoothGrad
from harmonia.explain.sobol import SobolAttribution
from harmonia.registry import construct, describe
from harmonia.verify.eva import EVA, CertifiedRegions

EXPLAINERS: dict[str, type[Explainer]] = {
    "saliency": Saliency,
    "smoothgrad": SmoothGrad,
    "integrated_gradients": IntegratedGradients,
    "sobol": SobolAttribution,
    "eva": EVA,
    "certified_regions": CertifiedRegions,
}


def build_explainer(name: str, **kwargs: Any) -> Explainer:
    """Construct the method registered as ``name`` with its keyword arguments."""
    return construct(EXPLAINERS, "attribution method", name, kwargs)


def list_explainers() -> dict[str, str]:
    """Registered names with the first line of each method's docstring."""
    return describe(EXPLAINERS)
