"""Right-for-the-Right-Reasons (RRR) penalty (Ross, Hughes & Doshi-Velez, IJCAI 2017), plain PyTorch.

RRR penalizes the input gradient of the summed log-probabilities ``∂ Σ_k log p_k / ∂x``
wherever the annotation says "irrelevant": ``Σ_pixels (A ⊙ ∂ Σ_k log p_k / ∂x)²``. Unlike
the harmonization loss it does not ask the saliency to take the human map's *shape*; it only
forbids sensitivity outside it, and through every class's log-probability, not only the true
class's logit.

Harmonia's human maps mark where people look (high = relevant), so the irrelevance mask is
``A = 1 - h / max(h)`` per image: 1 far from the map, 0 at its peak, soft in between (ClickMe
maps are continuous). A mapped sample whose map is all zeros marks nothing as relevant, so its
whole gradient is penalized (as the harmonization loss pushes its saliency towards zero).
The gradient is taken by ``AlignedClassifier`` from its one training forward (the penalty
declares the score it needs); this module only scores it.
"""

from __future__ import annotations

from torch import Tensor

from harmonia.losses.harmonization import check_maps
from harmonia.losses.penalty import Penalty, Schedule, TokenNormalization


def irrelevance_mask(human_maps: Tensor, eps: float = 1e-6) -> Tensor:
    """``1 - h / max_HW(h)`` per map of ``(N,1,H,W)`` non-negative maps, in [0, 1]."""
    peak = human_maps.amax(dim=(-2, -1), keepdim=True)
    return (1.0 - human_maps / (peak + eps)).clamp_(0.0, 1.0)


class RightReasons(Penalty):
    """``Σ_{C,H,W} (A ⊙ g)²`` per mapped sample, with ``g = ∂ Σ_k log p_k / ∂x``, averaged like harmonization.

    ``forward(gradient, human_maps, batch_size)`` takes the ``(M,C,H,W)`` gradient of the ``M``
    mapped samples and their ``(M,1,H,W)`` maps.

    Args:
        weight: λ of the term. Its scale is a squared gradient (not standardized), so it is
            not comparable with the harmonization weight.
        schedule: multiplier of ``weight`` over the fit.
        token_normalization: see ``Penalty``.
        validate: check maps for NaN, negative values and shape.
    """

    name = "rrr"
    gradient_key = "log_prob_sum"

    def __init__(
        self,
        weight: float = 1.0,
        schedule: Schedule | None = None,
        token_normalization: TokenNormalization = "batch",
        validate: bool = True,
    ) -> None:
        super().__init__(weight, schedule, token_normalization)
        self.validate = bool(validate)

    def score(self, logits: Tensor, label: Tensor) -> Tensor:
        """``Σ_k log p_k`` of each sample (the label plays no part)."""
        return logits.log_softmax(dim=-1).sum(dim=-1)

    def per_sample(self, gradient: Tensor, human_map: Tensor) -> Tensor:
        """Penalty of each mapped sample."""
        if gradient.ndim != 4:
            raise ValueError(f"gradient must have shape (M,C,H,W); got {tuple(gradient.shape)}")
        if self.validate:
            check_maps(gradient[:, :1], human_map)
        return (irrelevance_mask(human_map.to(gradient.dtype)) * gradient).pow(2).sum(dim=(1, 2, 3))
