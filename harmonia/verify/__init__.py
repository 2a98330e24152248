"""Attributions with guarantees: sound bounds of a network on input boxes, and EVA.

    from harmonia.verify import EVA, BoundedNetwork, margin_bounds, pgd_margins
    eva = EVA(epsilon=0.03, grid_size=8)          # also build_explainer("eva", ...)
    maps = eva.attribute(model.eval(), x, target)   # (N, 1, H, W), verified region importance
    bounds = margin_bounds(model, x, target, 0.03)  # (N, K) upper bounds of f_k − f_c
    tighter = margin_bounds(model, x, target, 0.03, method="alpha-crown")  # optimized relaxations
    reached = pgd_margins(model, x, target, 0.03)   # (N, K) what an attack reaches (≤ bounds)

Plain PyTorch (no Lightning); runs on the inputs' device.
"""

# harmonia.explain's registry names the explainers defined here: import it first, so that
# importing harmonia.verify on its own does not enter a half-initialized module.
import harmonia.explain  # noqa: F401  (isort: skip)

from harmonia.verify.attack import pgd_margins, pgd_overlap
from harmonia.verify.bounds import BoundedNetwork, BoundState, MarginBound, box_radius, margin_bounds, overlap
from harmonia.verify.eva import EVA, CertifiedRegions, cell_index, cell_masks
from harmonia.verify.graph import UnsupportedLayerError, build_graph

__all__ = [
    "EVA",
    "BoundState",
    "BoundedNetwork",
    "CertifiedRegions",
    "MarginBound",
    "UnsupportedLayerError",
    "box_radius",
    "build_graph",
    "cell_index",
    "cell_masks",
    "margin_bounds",
    "overlap",
    "pgd_margins",
    "pgd_overlap",
]
