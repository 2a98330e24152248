"""Sobol attribution (Fel et al., NeurIPS 2021), a black-box method.

For each image: ``nb_design · (d + 2)`` masks on a ``grid × grid`` lattice (``d = grid²``) from
an unscrambled Sobol design (``harmonia.explain.sensitivity.qmc_design``), each upsampled to the
image with *nearest* interpolation and applied by a perturbation; the target logits of the
perturbed images give Jansen total-order indices per cell
(``harmonia.explain.sensitivity.jansen_total_order``), and the ``grid × grid`` map is resized to
the image with TensorFlow's *bicubic* (:func:`tf_bicubic_resize`). Semantics and defaults follow
Xplique 2.0.2 (``attributions/global_sensitivity_analysis/``), down to its design (the Sobol
sequence without its first, all-zero point) and its resize, so the maps equal Xplique's to float
rounding; the code is Harmonia's.

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
Resize = Literal["tf_bicubic", "torch_bicubic", "nearest"]
RESIZES: tuple[str, ...] = ("tf_bicubic", "torch_bicubic", "nearest")

# TensorFlow tabulates its cubic kernel at 1024 sub-pixel offsets and rounds each offset to the
# nearest entry; reproducing the rounding keeps non-integer scale factors equal to TF's too.
_TF_CUBIC_TABLE = 1024


def keys_cubic(t: Tensor, a: float = -0.5) -> Tensor:
    """The cubic convolution kernel of Keys (1981) at distances ``t`` (``a = −0.5``: Catmull-Rom)."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def tf_bicubic_weights(in_size: int, out_size: int) -> Tensor:
    """``(out_size, in_size)`` float64 matrix of ``tf.image.resize(..., "bicubic")`` along one axis.

    TensorFlow 2's bicubic (``ResizeBicubic`` with ``half_pixel_centers=True``, no antialias):
    output ``i`` samples the input at ``(i + 0.5) · in/out − 0.5`` (float32 arithmetic, as TF),
    the four taps around it get the Keys kernel with ``a = −0.5`` (sub-pixel offset rounded to
    1/1024), taps outside the input are dropped and the remaining weights renormalized to sum 1.
    (PyTorch's ``bicubic`` uses ``a = −0.75`` and clamps out-of-image taps to the edge instead.)
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1; got {in_size} -> {out_size}")
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    centre = (torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5
    floor = centre.floor()
    delta = torch.round((centre - floor).double() * _TF_CUBIC_TABLE) / _TF_CUBIC_TABLE
    taps = floor.long()[:, None] + torch.arange(-1, 3)  # (out, 4)
    weights = keys_cubic(delta[:, None] - torch.arange(-1, 3, dtype=torch.float64))
    inside = (taps >= 0) & (taps < in_size)
    weights = weights * inside
    weights = weights / weights.sum(dim=1, keepdim=True)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    matrix.scatter_add_(1, taps.clamp(0, in_size - 1), weights)
    return matrix


def tf_bicubic_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize ``(…, H, W)`` to ``size`` as ``tf.image.resize(x, size, "bicubic")`` does (see above)."""
    rows = tf_bicubic_weights(x.shape[-2], size[0]).to(x.device)
    cols = tf_bicubic_weights(x.shape[-1], size[1]).to(x.device)
    return (rows @ x.double() @ cols.T).to(x.dtype)


def resize_map(x: Tensor, size: tuple[int, int], method: Resize = "tf_bicubic") -> Tensor:
    """Resize ``(N, C, h, w)`` maps to ``size``: TF's bicubic, PyTorch's bicubic or nearest."""
    if method == "tf_bicubic":
        return tf_bicubic_resize(x, size)
    if method == "torch_bicubic":  # a = −0.75, edge taps clamped (OpenCV's INTER_CUBIC)
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    if method == "nearest":
        return F.interpolate(x, size=size, mode="nearest-exact")
    raise ValueError(f"unknown resize {method!r}; use one of {RESIZES}")


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
            (``x + (m − 0.5) · sigma``, the paper's and Xplique's documented formula; note
            Xplique 2.0.2's code multiplies, ``x · (m − 0.5) · σ``).
        sigma: blur side (default 10) or amplitude (default 1); ignored by ``inpainting``.
        batch_size: perturbed images per forward (Xplique default 256).
        resize: how the ``grid × grid`` map is brought to the image size: ``"tf_bicubic"``
            (default, Xplique's ``tf.image.resize`` bicubic: Keys ``a = −0.5``, out-of-image
            taps dropped), ``"torch_bicubic"`` (PyTorch's ``a = −0.75``, edge taps clamped, like
            OpenCV's ``INTER_CUBIC`` that earlier Xplique releases used) or ``"nearest"`` (flat cells, no overshoot:
            values stay ≥ 0).
        skip_first_point: draw the design without the Sobol sequence's first (all-zero) point,
            as ``tf.math.sobol_sample`` does (default ``True``, Xplique's design); ``False``
            starts at the origin, as ``torch.quasirandom.SobolEngine`` and SciPy do.
    """

    def __init__(
        self,
        grid_size: int = 8,
        nb_design: int = 32,
        perturbation: Perturbation = "inpainting",
        sigma: float | None = None,
        batch_size: int = 256,
        resize: Resize = "tf_bicubic",
        skip_first_point: bool = True,
    ) -> None:
        super().__init__(batch_size)
        check_positive(grid_size=grid_size)
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {perturbation!r}; use one of {PERTURBATIONS}")
        if resize not in RESIZES:
            raise ValueError(f"unknown resize {resize!r}; use one of {RESIZES}")
        self.grid_size, self.nb_design, self.perturbation = int(grid_size), int(nb_design), perturbation
        self.resize, self.skip_first_point = resize, bool(skip_first_point)
        self.sigma = float(DEFAULT_SIGMA[perturbation] if sigma is None else sigma)
        # validates nb_design
        self._masks = qmc_design(self.nb_design, self.grid_size**2, "sobol", skip_first=self.skip_first_point)

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
        cells = indices.T.reshape(n, 1, g, g)  # float64 until after the resize
        return resize_map(cells, (h, w), self.resize).to(torch.float32)
