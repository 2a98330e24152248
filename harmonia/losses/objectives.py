"""Classification objectives: ``objective(logits (N,K), labels (N,) int64) -> scalar``.

Given to ``AlignedClassifier(objective=...)`` as objects (``class_path`` in YAML). The
Lipschitz-specific losses come from deel-torchlip; this module only adapts their target format.
"""

from __future__ import annotations

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
