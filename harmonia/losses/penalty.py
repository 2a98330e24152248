"""What every training penalty on input gradients shares, and the weight schedules they own.

A penalty declares the input gradient it needs (``gradient_key`` and ``score``); the module
forwards a batch once, asks autograd for each distinct gradient the penalties declare, and adds
``weight_at(progress) · penalty(gradient, human_map, batch_size)`` to the objective.

    penalties = [Harmonization(weight=1.0), RightReasons(weight=0.01)]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

from torch import Tensor, nn

TokenNormalization = Literal["batch", "mapped"]


class Schedule(ABC):
    """A multiplier of a penalty's weight as a function of training progress in [0, 1]."""

    @abstractmethod
    def scale(self, progress: float) -> float:
        """The weight's multiplier at ``progress`` (0: first optimizer step, 1: last)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """The weight as given, all along."""

    def scale(self, progress: float) -> float:
        """Always 1."""
        return 1.0


class Cosine(Schedule):
    """A cosine from 1 at the first optimizer step to ``end_scale`` at the last one.

    With ``end_scale < 1`` the term weighs most while the classifier forms (when a shortcut is
    learned) and less once its features are set, so the classifier can recover the accuracy
    the term costs it.
    """

    def __init__(self, end_scale: float = 0.1) -> None:
        if end_scale < 0:
            raise ValueError(f"Cosine end_scale must be >= 0; got {end_scale}")
        self.end_scale = float(end_scale)

    def scale(self, progress: float) -> float:
        """``end + (1 − end) · (1 + cos(π · progress)) / 2``."""
        progress = min(max(progress, 0.0), 1.0)
        return self.end_scale + (1.0 - self.end_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Penalty(nn.Module, ABC):
    """A weighted term on an input gradient of the mapped samples.

    Subclasses set ``name`` (the logged key: ``train/<name>``, ``val/<name>``), ``gradient_key``
    (penalties with the same key share one gradient) and implement ``score`` and ``forward``.

    Args:
        weight: λ of the term. 0 keeps it out of training (no input gradient is taken) but it
            is still measured on validation and test data.
        schedule: multiplier of ``weight`` over the fit (default ``Constant``).
        token_normalization: ``batch`` divides the summed per-sample terms by the batch size
            (the harmonization reference; the term shrinks when few samples carry maps),
            ``mapped`` by the number of mapped samples.
    """

    name = "penalty"

    def __init__(
        self, weight: float = 1.0, schedule: Schedule | None = None, token_normalization: TokenNormalization = "batch"
    ) -> None:
        super().__init__()
        if not weight >= 0:
            raise ValueError(f"{type(self).__name__} weight must be >= 0; got {weight}")
        if token_normalization not in ("batch", "mapped"):
            raise ValueError(f"token_normalization must be 'batch' or 'mapped'; got {token_normalization!r}")
        self.weight = float(weight)
        self.schedule = schedule if schedule is not None else Constant()
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"schedule must be a harmonia.losses.Schedule; got {type(self.schedule).__name__}")
        self.token_normalization = token_normalization

    @property
    @abstractmethod
    def gradient_key(self) -> str:
        """Names the input gradient this penalty needs; equal keys mean equal gradients."""

    @abstractmethod
    def score(self, logits: Tensor, label: Tensor) -> Tensor:
        """``(M,)`` scores of the mapped samples whose summed input gradient the penalty reads."""

    @abstractmethod
    def per_sample(self, gradient: Tensor, human_map: Tensor) -> Tensor:
        """``(M,)`` unweighted terms from the ``(M,C,H,W)`` gradient and ``(M,1,H,W)`` maps."""

    def forward(self, gradient: Tensor, human_map: Tensor, batch_size: int | None = None) -> Tensor:
        """The unweighted term for ``M`` mapped samples out of a batch of ``batch_size``."""
        terms = self.per_sample(gradient, human_map)
        return normalize_tokens(terms, self.token_normalization, batch_size)

    def weight_at(self, progress: float) -> float:
        """λ at training ``progress`` in [0, 1]."""
        return self.weight * self.schedule.scale(progress)

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}, schedule={self.schedule!r}, token_normalization={self.token_normalization!r}"


def normalize_tokens(terms: Tensor, token_normalization: TokenNormalization, batch_size: int | None) -> Tensor:
    """Sum of per-sample ``terms`` over the batch size (``batch``) or over their count (``mapped``)."""
    if token_normalization == "mapped" or batch_size is None:
        return terms.sum() / max(terms.numel(), 1)
    if batch_size < terms.numel():
        raise ValueError(f"batch_size {batch_size} < number of mapped samples {terms.numel()}")
    return terms.sum() / max(batch_size, 1)
