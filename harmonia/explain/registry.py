"""Attribution methods by name, so callbacks and YAML configs can name them.

    build_explainer("sobol", grid_size=8, nb_design=16)   # → SobolAttribution(...)
    list_explainers()                                      # → {"saliency": "...", ...}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from harmonia.explain.base import Explainer
from harmonia.explain.integrated_gradients import IntegratedGradients
from harmonia.explain.saliency import Saliency, SmoothGrad
from harmonia.explain.sobol import SobolAttribution

T = TypeVar("T")

EXPLAINERS: dict[str, type[Explainer]] = {
    "saliency": Saliency,
    "smoothgrad": SmoothGrad,
    "integrated_gradients": IntegratedGradients,
    "sobol": SobolAttribution,
}


def construct(registry: Mapping[str, Callable[..., T]], kind: str, name: str, kwargs: dict[str, Any]) -> T:
    """``registry[name](**kwargs)`` with errors that name the ``kind`` and the entry.

    Shared by ``build_explainer`` and ``harmonia.metrics.build_metric``.
    """
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; registered: {', '.join(registry)}")
    try:
        return registry[name](**kwargs)
    except (TypeError, ValueError) as error:  # an unknown or bad argument (torchmetrics: ValueError)
        raise type(error)(f"{kind} {name!r}: {error}") from None


def build_explainer(name: str, **kwargs: Any) -> Explainer:
    """Construct the method registered as ``name`` with its keyword arguments."""
    return construct(EXPLAINERS, "attribution method", name, kwargs)


def list_explainers() -> dict[str, str]:
    """Registered names with the first line of each method's docstring."""
    return {name: (cls.__doc__ or "").strip().splitlines()[0] for name, cls in EXPLAINERS.items()}
