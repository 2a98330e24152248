"""Harmonization loss (Fel, Linsley et al., NeurIPS 2022), in plain PyTorch.

Semantics follow the reference TF code (serre-lab/harmonization, ``training/loss.py`` and
``training/pyramid.py``). ``harmonization_error`` scores saliency maps the caller computed, on
any model, with or without Lightning; the ``Harmonization`` penalty is what
``AlignedClassifier`` trains with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from harmonia.explain.saliency import Saliency
from harmonia.losses.penalty import Penalty, Schedule, TokenNormalization

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


def harmonization_error(saliency: Tensor, human_maps: Tensor, levels: int = 5, first_level: int = 0) -> Tensor:
    """Per-sample harmonization error ``(M,)`` between saliency maps and human maps, both ``(M,1,H,W)``.

    Both maps are standardized and cut at zero; the human map is rescaled to the saliency's
    peak, and the pyramidal MSE compares them at levels ``first_level..levels-1``.
    """
    saliency = standardize_cut(saliency)
    human = standardize_cut(human_maps)
    # The peak is a constant (stop-gradient) so that the model cannot lower the loss by
    # shrinking its own saliency.
    peak = saliency.amax(dim=(-2, -1), keepdim=True).detach() + 1e-6
    human = human / (human.amax(dim=(-2, -1), keepdim=True) + 1e-6) * peak
    return pyramidal_mse(saliency, human, levels, first_level)


class Harmonization(Penalty):
    """The harmonization penalty: the model's saliency pushed towards human maps through a pyramid.

    ``forward(gradient, human_maps, batch_size)`` turns the input gradient of the ``M`` mapped
    samples into their saliency (``saliency.reduce``) and returns the unweighted term
    ``Σ_m harmonization_error_m / batch_size`` (``token_normalization: batch``, the reference
    number) or ``/ M`` (``mapped``).

    Args:
        weight: λ of the term (the reference: 1 with cross-entropy).
        saliency: the map trained, a ``harmonia.explain.Saliency``; its ``score`` picks the
            differentiated score and its ``reduction`` the channel reduction. Default
            ``Saliency(score="logit", reduction="mean")``: the reference's signed channel mean
            of the true logit's gradient. Standardize-cut then ignores negative evidence, so a
            model may keep using a region whose gradient is negative; ``mean_abs`` penalizes
            any sensitivity outside the human map.
        levels: pyramid levels (the reference compares 5: levels 0..4).
        first_level: first level compared (0, the reference, is the full-resolution map).
            Starting at ``k > 0`` asks the saliency to sit where the human map is at a
            ``2^k``-pixel scale without tracing its fine shape.
        token_normalization: see ``Penalty``.
        schedule: multiplier of ``weight`` over the fit (``harmonia.losses.Cosine``, ...).
        validate: check maps for NaN, negative values and shape (one host sync per call).
    """

    name = "harmonization"

    def __init__(
        self,
        weight: float = 1.0,
        saliency: Saliency | None = None,
        levels: int = 5,
        first_level: int = 0,
        token_normalization: TokenNormalization = "batch",
        schedule: Schedule | None = None,
        validate: bool = True,
    ) -> None:
        super().__init__(weight, schedule, token_normalization)
        if levels < 1:
            raise ValueError(f"levels must be >= 1; got {levels}")
        if not 0 <= first_level < levels:
            raise ValueError(f"first_level must lie in [0, levels - 1] = [0, {levels - 1}]; got {first_level}")
        self.saliency = saliency if saliency is not None else Saliency(score="logit", reduction="mean")
        if not isinstance(self.saliency, Saliency):
            raise TypeError(f"saliency must be a harmonia.explain.Saliency; got {type(self.saliency).__name__}")
        self.levels, self.first_level, self.validate = int(levels), int(first_level), bool(validate)

    @property
    def gradient_key(self) -> str:
        """The target class's score (``logit`` or ``log_prob``): one gradient per score kind."""
        return f"target_{self.saliency.score}"

    def score(self, logits: Tensor, label: Tensor) -> Tensor:
        """The saliency's score of the true class."""
        return self.saliency.score_of(logits, label)

    def per_sample(self, gradient: Tensor, human_map: Tensor) -> Tensor:
        """Harmonization error of each mapped sample."""
        saliency = self.saliency.reduce(gradient)
        if self.validate:
            check_maps(saliency, human_map)
        return harmonization_error(saliency, human_map.to(saliency.dtype), self.levels, self.first_level)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, saliency={self.saliency!r}, levels={self.levels}, "
                f"first_level={self.first_level}")
