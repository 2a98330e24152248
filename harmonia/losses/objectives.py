"""Classification objectives, built by name: ``build_objective("cross_entropy", label_smoothing=0.1)``.

Each objective maps ``(logits (N,K), labels (N,) int64)`` to a scalar. The Lipschitz-specific
losses come from deel-torchlip; this module only adapts their target format (one-hot).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from deel.torchlip import HKRMulticlassLoss
from deel.torchlip.modules.loss import TauCrossEntropyLoss
from torch import Tensor, nn


class CrossEntropy(nn.Module):
    """Cross-entropy with label smoothing (reference default 0.1)."""

    def __init__(self, label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of the batch."""
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


class TauCrossEntropy(nn.Module):
    """deel-torchlip's τ-cross-entropy ``CE(τ·logits)/τ``; τ sets the margin a 1-Lipschitz net aims for."""

    def __init__(self, tau: float = 10.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.loss = TauCrossEntropyLoss(tau=tau, label_smoothing=label_smoothing)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean τ-cross-entropy of the batch."""
        return self.loss(logits, labels)


class HKR(nn.Module):
    """deel-torchlip's multiclass hinge-Kantorovich-Rubinstein loss (``alpha`` in [0, 1]).

    The KR term uses batch statistics of the local batch: under DDP each process estimates it
    on its own shard (deel-torchlip's ``multi_gpu`` mode is not wired here).
    """

    def __init__(self, alpha: float = 0.98, min_margin: float = 0.3) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"HKR alpha must lie in [0, 1] (deel-torchlip convention); got {alpha}")
        self.loss = HKRMulticlassLoss(alpha=alpha, min_margin=min_margin)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean HKR loss; labels are one-hot encoded as deel-torchlip expects."""
        onehot = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
        return self.loss(logits, onehot)


OBJECTIVES: dict[str, Callable[..., nn.Module]] = {
    "cross_entropy": CrossEntropy,
    "tau_cross_entropy": TauCrossEntropy,
    "hkr": HKR,
}


def build_objective(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate a classification objective by name (see ``OBJECTIVES``)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)


def decayed_parameters(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split parameters into (decayed, not decayed) as the reference's L2 term does.

    The reference adds ``λ_w Σ ½‖W‖²`` over every trainable weight except normalization,
    embedding and class-token parameters. With SGD, ``weight_decay=λ_w`` on the first group is
    the same gradient.
    """
    skip_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.Embedding)
    skip_words = ("norm", "embed", "class_token", "cls_token", "pos_embed")
    decay, no_decay = [], []
    for module_name, sub in module.named_modules():
        for name, param in sub.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full = f"{module_name}.{name}".lower()
            # Parametrized layers (deel-torchlip) store the raw weight under "parametrizations";
            # their names contain no 'norm' of a normalization layer, so only match leaf names.
            leaf = full.replace("parametrizations.", "")
            if isinstance(sub, skip_types) or any(w in leaf for w in skip_words):
                no_decay.append(param)
            else:
                decay.append(param)
    return decay, no_decay
