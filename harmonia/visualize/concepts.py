"""A MACO picture per CRAFT concept, sized to sit beside the concept's top crops in a mosaic."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.concepts import ConceptBank
from harmonia.visualize.figure import maco_figure
from harmonia.visualize.maco import PRESETS, run_maco
from harmonia.visualize.objectives import Concept, Layer
from harmonia.visualize.spectrum import Spectrum


def concept_pictures(
    model: nn.Module,
    layer: Layer,
    bank: ConceptBank,
    spectrum: Spectrum,
    size: int | tuple[int, int] | None = None,
    concepts: Sequence[int] | None = None,
    preset: str = "small",
    seed: int | Sequence[int] = 0,
    background: float = 1.0,
    **maco_args,
) -> Tensor:
    """``(k, C, h, w)`` pictures in [0, 1]: each concept's MACO image with its transparency composited over ``background``.

    Args:
        model: the classifier the bank was extracted from.
        layer: the concept layer (``Craft``'s ``layer``).
        bank: the concept bank (its rows are the directions maximized).
        spectrum: the fixed magnitude (e.g. ``Spectrum.from_images`` of the class's probe images).
        size: output side(s), e.g. the mosaic's crop size (default: the canvas).
        concepts: which concepts (default all), in this order.
        preset: ``"small"`` or ``"xplique"`` settings (:data:`harmonia.visualize.PRESETS`),
            overridden by ``maco_args`` (``steps=...``).
        seed: as :func:`run_maco`; shards pass per-concept seeds.
        background: grey level behind transparent pixels.

    The pictures have the spectrum's channel count (grey stays grey), so they can be put in
    front of the top crops: ``torch.cat([pictures[:, None], bank.top_crops(n)], 1)`` gives
    the ``(k, n+1, C, p, p)`` rows :func:`harmonia.concepts.concept_mosaic` draws.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {preset!r}")
    chosen = list(range(bank.n_concepts)) if concepts is None else [int(j) for j in concepts]
    objectives = [Concept(layer, bank, j) for j in chosen]
    result = run_maco(model, objectives, spectrum, seed=seed, **{**PRESETS[preset], **maco_args})
    pictures = maco_figure(result.image, result.alpha, background=background).cpu()  # (k, 3, H, W)
    if spectrum.channels == 1:
        pictures = pictures.mean(1, keepdim=True)
    if size is not None:
        target = (size, size) if isinstance(size, int) else tuple(size)
        pictures = F.interpolate(pictures, size=target, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return pictures


def with_pictures(top_crops: Tensor, pictures: Tensor) -> Tensor:
    """Prepend one picture per concept to its top crops: ``(k, n, C, p, p)`` + ``(k, C, p, p)`` → ``(k, n+1, C, p, p)``."""
    if top_crops.ndim != 5 or pictures.shape != (top_crops.shape[0], *top_crops.shape[2:]):
        raise ValueError(f"pictures {tuple(pictures.shape)} do not match top crops {tuple(top_crops.shape)}")
    return torch.cat([pictures.to(top_crops)[:, None], top_crops], 1)
