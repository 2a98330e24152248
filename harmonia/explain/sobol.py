"""Sobol attribution (Fel et al., NeurIPS 2021), a black-box method (SPEC §6).

For each image: ``nb_design · (d + 2)`` masks on a ``grid × grid`` lattice (``d = grid²``) from
an unscrambled Sobol design (``harmonia.explain.sensitivity.qmc_design``), each upsampled to the
image with *nearest* interpolation and applied by a perturbation; the target logits of the
perturbed images give Jansen total-order indices per cell
(``harmonia.explain.sensitivity.jansen_total_order``), and the ``grid × grid`` map is resized to
the image with *bicubic* interpolation. Semantics follow Xplique 2.0.2
(``attributions/global_sensitivity_analysis/``); the code is Harmonia's.

Cost: exactly ``N · nb_design · (grid² + 2)`` forwards, batched ``batch_size`` at a time across
images; masks are upsampled per batch (memory stays at one batch whatever the image size).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.explain.base import Explainer, batched_scores, check_positive
from harmonia.explain.sensitivity import jansen_total_order, qmc_design

Perturbation = Literal["inpainting", "blurring", "amplitude"]
PERTURBATIONS: tuple[str, ...] = ("inpainting", "blurring", "amplitude")
DEFAULT_SIGMA = {"inpainting": 0.0, "blurring": 10.0, "amplitude": 1.0}


def box_blur(x: Tensor, size: int) -> Tensor:
    """Mean over a ``size × size`` window per channel, reflect-101 borders (OpenCV ``cv2.blur``).

    Xplique's ``blurring`` perturbation calls ``cv2.blur(x, (σ, σ))``: a box filter of side σ
    despite the name. For an even side OpenCV anchors the window at ``size // 2``, so it spans
    ``[-size//2, size - size//2 - 1]``; the padding reproduces that. Windows larger than the image
    are clipped to it (reflect padding needs ``pad < size of the image``).
    """
    size = int(size)
    if size <= 1:
        return x
    h, w = x.shape[-2:]
    sh, sw = min(size, 2 * h - 1), min(size, 2 * w - 1)
    pad = (sw // 2, sw - sw // 2 - 1, sh // 2, sh - sh // 2 - 1)
    padded = F.pad(x, pad, mode="reflect")
    return F.avg_pool2d(padded, (sh, sw), stride=1)


class SobolAttribution(Explainer):
    """Total-order Sobol indices of grid cells, resized to the image.

    Args:
        grid_size: cells per side (Xplique default 8).
        nb_design: Sobol design size, a power of two (Xplique default 32).
        perturbation: ``inpainting`` (``x · m``, the default), ``blurring``
            (``x · m + blur(x) · (1 − m)``, box blur of side ``sigma``) or ``amplitude``
            (``x + (m − 0.5) · sigma``, SPEC §6 and Xplique's documented formula; note Xplique
            2.0.2's code multiplies, ``x · (m − 0.5) · σ``).
        sigma: blur side (default 10) or amplitude (default 1); ignored by ``inpainting``.
        batch_size: perturbed images per forward (Xplique default 256).
    """

    def __init__(
        self,
        grid_size: int = 8,
        nb_design: int = 32,
        perturbation: Perturbation = "inpainting",
        sigma: float | None = None,
        batch_size: int = 256,
    ) -> None:
        super().__init__(batch_size)
        check_positive(grid_size=grid_size)
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {perturbation!r}; use one of {PERTURBATIONS}")
        self.grid_size, self.nb_design, self.perturbation = int(grid_size), int(nb_design), perturbation
        self.sigma = float(DEFAULT_SIGMA[perturbation] if sigma is None else sigma)
        self._masks = qmc_design(self.nb_design, self.grid_size**2, "sobol")  # validates nb_design

    @property
    def forwards_per_image(self) -> int:
        """Model evaluations per explained image: ``nb_design · (grid² + 2)``."""
        return len(self._masks)

    def _attribute(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        n, g = len(x), self.grid_size
        h, w = x.shape[-2:]
        if g > min(h, w):
            raise ValueError(f"grid_size {g} is larger than the {h}×{w} image")
        masks = self._masks.to(x.device, x.dtype).view(-1, 1, g, g)
        m = len(masks)
        blurred = box_blur(x, int(self.sigma)) if self.perturbation == "blurring" else None
        flat = torch.arange(n * m, device=x.device)
        image, design = flat // m, flat % m  # flat index → (image, mask)

        def perturbed(part: slice) -> tuple[Tensor, Tensor]:
            i = image[part]
            mask = F.interpolate(masks[design[part]], size=(h, w), mode="nearest-exact")
            if self.perturbation == "inpainting":
                inputs = x[i] * mask
            elif self.perturbation == "blurring":
                inputs = x[i] * mask + blurred[i] * (1 - mask)
            else:
                inputs = x[i] + (mask - 0.5) * self.sigma
            return inputs, target[i]

        scores = batched_scores(model, perturbed, n * m, self.batch_size)
        indices = jansen_total_order(scores.view(n, m).T.double(), self.nb_design)  # (d, n)
        cells = indices.T.reshape(n, 1, g, g).to(torch.float32)
        # Bicubic with a = −0.75 and half-pixel centres: OpenCV's INTER_CUBIC, as the reference.
        return F.interpolate(cells, size=(h, w), mode="bicubic", align_corners=False)
