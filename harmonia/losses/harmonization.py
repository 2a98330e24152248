"""Harmonization loss (Fel, Linsley et al., NeurIPS 2022), in plain PyTorch.

Semantics follow the reference TF code (serre-lab/harmonization, ``training/loss.py`` and
``training/pyramid.py``); see SPEC.md §1. The loss takes saliency maps that the caller has
computed (``harmonia.explain.gradient.harmonization_saliency``) so that it can be used on any
model, with or without Lightning.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TokenNormalization = Literal["batch", "mapped"]

# 5x5 binomial kernel outer([1,4,6,4,1])/256, the reference pyramid's low-pass filter.
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
_BINOMIAL_2D = torch.outer(_BINOMIAL, _BINOMIAL) / 256.0


def standardize_cut(maps: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-map ``relu((m - mean) / (std + eps))`` over the spatial axes of ``(N,1,H,W)`` maps.

    The std is the population std (TF's ``reduce_std``). A constant map has std 0 and becomes
    all zeros, never NaN.
    """
    mean = maps.mean(dim=(-2, -1), keepdim=True)
    std = maps.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return torch.relu((maps - mean) / (std + eps))


def _same_pad(size: int, kernel: int = 5, stride: int = 2) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) for one axis: the extra pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def gaussian_pyramid(maps: Tensor, levels: int = 5) -> list[Tensor]:
    """``levels`` maps: the input, then repeated binomial blur + stride-2 subsampling.

    Matches the reference (TF conv2d with padding 'SAME'), including its asymmetric padding.
    """
    kernel = _BINOMIAL_2D.to(device=maps.device, dtype=maps.dtype)
    channels = maps.shape[1]
    weight = kernel.expand(channels, 1, 5, 5)
    pyramid = [maps]
    for _ in range(levels - 1):
        top, bottom = _same_pad(maps.shape[-2])
        left, right = _same_pad(maps.shape[-1])
        maps = F.conv2d(F.pad(maps, (left, right, top, bottom)), weight, stride=2, groups=channels)
        pyramid.append(maps)
    return pyramid


def pyramidal_mse(a: Tensor, b: Tensor, levels: int = 5, first_level: int = 0) -> Tensor:
    """Per-sample mean over pyramid levels ``first_level..levels-1`` of the spatial MSE
    between ``a`` and ``b``: shape ``(N,)``."""
    # The pyramid is linear (zero padding, a fixed kernel), so the pyramid of a - b is the
    # difference of the two pyramids (up to float rounding): one pyramid instead of two.
    per_level = [level.pow(2).mean(dim=(1, 2, 3)) for level in gaussian_pyramid(a - b, levels)[first_level:]]
    return torch.stack(per_level).mean(dim=0)


def check_maps(saliency: Tensor, human_maps: Tensor) -> None:
    """Raise ``ValueError`` for maps the loss cannot use: wrong shape, NaN/inf or negative values."""
    if human_maps.ndim != 4 or human_maps.shape[1] != 1:
        raise ValueError(f"human maps must have shape (N,1,H,W); got {tuple(human_maps.shape)}")
    if saliency.shape != human_maps.shape:
        raise ValueError(
            f"saliency shape {tuple(saliency.shape)} does not match human map shape "
            f"{tuple(human_maps.shape)}"
        )
    finite = torch.isfinite(human_maps).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(f"human maps contain NaN or inf values (samples {bad} of this batch)")
    nonneg = (human_maps >= 0).flatten(1).all(dim=1)
    if not bool(nonneg.all()):
        bad = torch.nonzero(~nonneg).flatten().tolist()
        raise ValueError(f"human maps contain negative values (samples {bad} of this batch)")


class HarmonizationLoss(nn.Module):
    """Pyramidal MSE between standardized-cut saliency maps and rescaled human maps.

    ``forward(saliency, human_maps, batch_size)`` takes the maps of the *mapped* samples only
    (``M`` of them) and returns the unweighted harmonization term (multiply by λ outside).

    Args:
        levels: pyramid levels compared (the reference compares 5: levels 0..4).
        token_normalization: ``"batch"`` divides the summed per-sample errors by the full batch
            size, reproducing the reference number exactly (it averages over token-0 samples
            too, so the term shrinks when few samples carry maps); ``"mapped"`` divides by ``M``.
        validate: check maps for NaN, negative values and shape (one host sync per call).
        first_level: first pyramid level compared (0, the reference, is the full-resolution
            map). Level ``k`` compares the maps blurred and subsampled ``k`` times, so starting
            at ``k > 0`` asks the saliency to sit where the human map is at a ``2^k``-pixel
            scale without tracing its fine shape (a looser constraint; see benchmarks/README.md).
    """

    def __init__(
        self,
        levels: int = 5,
        token_normalization: TokenNormalization = "batch",
        validate: bool = True,
        first_level: int = 0,
    ) -> None:
        super().__init__()
        if token_normalization not in ("batch", "mapped"):
            raise ValueError(
                f"token_normalization must be 'batch' or 'mapped'; got {token_normalization!r}"
            )
        if levels < 1:
            raise ValueError(f"levels must be >= 1; got {levels}")
        if not 0 <= first_level < levels:
            raise ValueError(f"first_level must lie in [0, levels - 1] = [0, {levels - 1}]; got {first_level}")
        self.levels = levels
        self.first_level = first_level
        self.token_normalization = token_normalization
        self.validate = validate

    def per_sample(self, saliency: Tensor, human_maps: Tensor) -> Tensor:
        """Per-sample harmonization error, shape ``(M,)``."""
        if self.validate:
            check_maps(saliency, human_maps)
        saliency = standardize_cut(saliency)
        human = standardize_cut(human_maps)
        # Rescale the human map to the saliency's peak; the peak is a constant (stop-gradient)
        # so the model cannot lower the loss by shrinking its own saliency.
        peak = saliency.amax(dim=(-2, -1), keepdim=True).detach() + 1e-6
        human = human / (human.amax(dim=(-2, -1), keepdim=True) + 1e-6) * peak
        return pyramidal_mse(saliency, human, self.levels, self.first_level)

    def forward(self, saliency: Tensor, human_maps: Tensor, batch_size: int | None = None) -> Tensor:
        """Harmonization term for ``M`` mapped samples out of a batch of ``batch_size``."""
        errors = self.per_sample(saliency, human_maps)
        if self.token_normalization == "mapped" or batch_size is None:
            denominator = max(errors.numel(), 1)
        else:
            if batch_size < errors.numel():
                raise ValueError(f"batch_size {batch_size} < number of mapped samples {errors.numel()}")
            denominator = max(batch_size, 1)
        return errors.sum() / denominator
