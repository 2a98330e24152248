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

EXPLAINERS: dict[str, type[Explainer]] = {
    "saliency": Saliency,
    "smoothgrad": SmoothGrad,
    "integrated_gradients": IntegratedGradients,
    "sobol": SobolAttribution,
}


def build_explainer(name: str, **kwargs: Any) -> Explainer:
    """Construct the method registered as ``name`` with its keyword arguments."""
    if name not in EXPLAINERS:
        raise ValueError(f"unknown attribution method {name!r}; registered: {', '.join(EXPLAINERS)}")
    try:
        return EXPLAINERS[name](**kwargs)
    except TypeError as error:  # an unknown keyword: name the method in the message
        raise TypeError(f"attribution method {name!r}: {error}") from None


def list_explainers() -> dict[str, str]:
    """Registered names with the first line of each method's docstring."""
    return {name: (cls.__doc__ or "").strip().splitlines()[0] for name, cls in EXPLAINERS.items()}
