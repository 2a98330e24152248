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
The gradient is taken by the caller (``AlignedClassifier.forward_with_explanations``:
``torch.autograd.grad(log_prob_sum(logits), x, create_graph=True)``); this module only scores it.
"""

from __future__ import annotations

from torch import Tensor, nn

from harmonia.losses.harmonization import TokenNormalization, check_maps


def irrelevance_mask(human_maps: Tensor, eps: float = 1e-6) -> Tensor:
    """``1 - h / max_HW(h)`` per map of ``(N,1,H,W)`` non-negative maps, in [0, 1]."""
    peak = human_maps.amax(dim=(-2, -1), keepdim=True)
    return (1.0 - human_maps / (peak + eps)).clamp_(0.0, 1.0)


def log_prob_sum(logits: Tensor) -> Tensor:
    """``Σ_n Σ_k log p_{n,k}``: the score whose input gradient RRR penalizes."""
    return logits.log_softmax(dim=-1).sum()


class RightReasonsLoss(nn.Module):
    """``Σ_{C,H,W} (A ⊙ g)²`` per mapped sample, averaged like the harmonization term.

    ``forward(gradient, human_maps, batch_size)`` takes ``gradient = ∂ Σ_k log p_k / ∂x`` of
    the ``M`` mapped samples, shape ``(M,C,H,W)``, and their maps ``(M,1,H,W)``.

    Args:
        token_normalization: ``"batch"`` divides the summed per-sample penalties by the batch
            size (as ``HarmonizationLoss`` does by default), ``"mapped"`` by ``M``.
        validate: check maps for NaN, negative values and shape.
    """

    def __init__(self, token_normalization: TokenNormalization = "batch", validate: bool = True) -> None:
        super().__init__()
        if token_normalization not in ("batch", "mapped"):
            raise ValueError(f"token_normalization must be 'batch' or 'mapped'; got {token_normalization!r}")
        self.token_normalization = token_normalization
        self.validate = validate

    def per_sample(self, gradient: Tensor, human_maps: Tensor) -> Tensor:
        """Per-sample penalty, shape ``(M,)``."""
        if gradient.ndim != 4:
            raise ValueError(f"gradient must have shape (M,C,H,W); got {tuple(gradient.shape)}")
        if self.validate:
            check_maps(gradient[:, :1], human_maps)
        return (irrelevance_mask(human_maps) * gradient).pow(2).sum(dim=(1, 2, 3))

    def forward(self, gradient: Tensor, human_maps: Tensor, batch_size: int | None = None) -> Tensor:
        """RRR term for ``M`` mapped samples out of a batch of ``batch_size``."""
        penalties = self.per_sample(gradient, human_maps)
        if self.token_normalization == "mapped" or batch_size is None:
            return penalties.sum() / max(penalties.numel(), 1)
        if batch_size < penalties.numel():
            raise ValueError(f"batch_size {batch_size} < number of mapped samples {penalties.numel()}")
        return penalties.sum() / max(batch_size, 1)

