"""Fidelity metrics: does removing what an explanation ranks first change the model's score?

Semantics of Xplique's ``metrics/fidelity.py``; the code is Harmonia's. Scores are
the target's raw logit unless ``activation`` is ``softmax``/``sigmoid``. Multi-channel
explanations are averaged over channels; a pixel is perturbed in all its channels at once.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.explain.base import Activation, batched_scores, check_batch
from harmonia.metrics.base import ExplanationMetric, SampleMean, as_map
from harmonia.metrics.correlation import spearman_rows

Ties = Literal["random", "first", "last"]
TIES: tuple[str, ...] = ("random", "first", "last")


def _check_fraction(name: str, value: float, low_open: bool = True) -> None:
    if not ((0 < value) if low_open else (0 <= value)) or value > 1:
        raise ValueError(f"{name} must lie in {'(0' if low_open else '[0'}, 1]; got {value}")


class CausalFidelity(ExplanationMetric):
    """Deletion or insertion curve and its area (Petsiuk et al. 2018, RISE).

    Pixels are ranked by the explanation, largest first. At step
    ``k = 0..steps`` the first ``n_k = ⌊k/steps · ⌊HW · max_percentage_perturbed⌋⌋`` pixels are
    flipped: *deletion* sets them to ``baseline`` in the image, *insertion* copies them from the
    image into a ``baseline`` canvas. The curve is the score averaged over images at each step;
    ``compute()`` is its area on [0, 1] (trapezoids: ``mean((c[:-1] + c[1:]) / 2)``). As the
    area is linear in the curve, it equals the mean of per-image areas: the state is the summed
    curve, so shards reduce exactly.

    Ties (pixels of equal attribution) are ordered by ``ties``. A map with many exact zeros
    (ReLU gradients, quantized or thresholded maps, Sobol cells of index 0) flips those pixels
    in whatever order ties are broken, and that order can move the score by tens of percent.
    ``"random"`` (the default) orders them by one seeded random permutation of the pixel
    positions, the same for every image (so values do not depend on batching or sharding):
    no part of the image goes first. ``"first"`` keeps row-major pixel order (the top-left
    corner first) and ``"last"`` the reverse (the bottom-right corner first): either one favours
    a corner, which matters when the evidence sits in a corner (decoy digits put their shortcut
    there). Xplique ranks with ``np.argsort(...)[::-1]``: ``"last"`` where NumPy keeps equal
    values in order, but its default sort is not stable, so its tie order is not defined; maps
    without ties score the same with every choice, and as Xplique.

    Args:
        mode: ``"deletion"`` (lower is better) or ``"insertion"`` (higher is better).
        steps: curve steps (Xplique default 10).
        max_percentage_perturbed: fraction of pixels flipped at the last step (default 1.0).
        baseline: value of removed pixels (Xplique ``baseline_mode`` 0.0).
        activation: ``None`` (raw logit), ``softmax`` or ``sigmoid``.
        batch_size: perturbed images per forward.
        ties: ``"random"`` (default), ``"first"`` or ``"last"``: order of equal attributions.
        seed: seed of the ``"random"`` tie order.
    """

    needs = ("model", "inputs", "targets", "explanations")

    def __init__(
        self,
        mode: Literal["deletion", "insertion"] = "deletion",
        steps: int = 10,
        max_percentage_perturbed: float = 1.0,
        baseline: float = 0.0,
        activation: Activation | None = None,
        batch_size: int = 256,
        ties: Ties = "random",
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if ties not in TIES:
            raise ValueError(f"ties must be one of {TIES}; got {ties!r}")
        self.ties, self.seed = ties, int(seed)
        if mode not in ("deletion", "insertion"):
            raise ValueError(f"mode must be 'deletion' or 'insertion'; got {mode!r}")
        if int(steps) < 1 or int(batch_size) < 1:
            raise ValueError(f"steps and batch_size must be >= 1; got {steps}, {batch_size}")
        _check_fraction("max_percentage_perturbed", max_percentage_perturbed)
        self.mode, self.steps, self.max_percentage_perturbed = mode, int(steps), float(max_percentage_perturbed)
        self.baseline, self.activation, self.batch_size = float(baseline), activation, int(batch_size)
        self.add_state("curve_sum", torch.zeros(self.steps + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def flipped_counts(self, num_pixels: int) -> Tensor:
        """``n_k`` for ``k = 0..steps``: pixels flipped at each step."""
        last = int(num_pixels * self.max_percentage_perturbed)
        return torch.linspace(0, last, self.steps + 1, dtype=torch.float64).long()

    def tie_order(self, num_pixels: int) -> Tensor:
        """The pixel order that breaks ties: a permutation of ``range(num_pixels)`` (see ``ties``)."""
        if self.ties == "first":
            return torch.arange(num_pixels)
        if self.ties == "last":
            return torch.arange(num_pixels).flip(0)
        return torch.randperm(num_pixels, generator=torch.Generator().manual_seed(self.seed))

    def ranks(self, explanations: Tensor) -> Tensor:
        """``(N, HW)`` pixel indices, most important first, ties in :meth:`tie_order`."""
        ranking = explanations.flatten(1)
        tie_order = self.tie_order(ranking.shape[1]).to(ranking.device)
        # A stable sort of the pixels laid out in tie order keeps that order among equals.
        return tie_order[torch.argsort(ranking[:, tie_order], dim=1, descending=True, stable=True)]

    def scores(self, model: nn.Module, inputs: Tensor, targets: Tensor, explanations: Tensor) -> Tensor:
        """Per-image curves ``(N, steps + 1)``."""
        targets = check_batch(inputs, targets)
        n, (h, w) = len(inputs), inputs.shape[-2:]
        order = self.ranks(as_map(explanations, (h, w)).to(inputs.device))
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(h * w, device=inputs.device).expand(n, -1))
        rank = rank.view(n, 1, h, w)
        counts = self.flipped_counts(h * w).to(inputs.device)
        k_all = self.steps + 1
        base = torch.full_like(inputs[:1], self.baseline)
        start, end = (inputs, base.expand_as(inputs)) if self.mode == "deletion" else (base.expand_as(inputs), inputs)

        def perturbed(part: slice) -> tuple[Tensor, Tensor]:
            flat = torch.arange(part.start, part.stop, device=inputs.device)
            i, k = flat // k_all, flat % k_all
            flip = rank[i] < counts[k].view(-1, 1, 1, 1)
            return torch.where(flip, end[i], start[i]), targets[i]

        curve = batched_scores(model, perturbed, n * k_all, self.batch_size, self.activation)
        return curve.view(n, k_all)

    def update(self, model: nn.Module, inputs: Tensor, targets: Tensor, explanations: Tensor) -> None:
        """Add the curves of a batch."""
        if len(inputs) == 0:
            return
        curves = self.scores(model, inputs, targets, explanations)
        self.curve_sum += curves.sum(dim=0).to(self.curve_sum)
        self.count += len(curves)

    def curve(self) -> Tensor:
        """The mean curve ``(steps + 1,)`` (synchronized across processes like ``compute``)."""
        return self.curve_sum / self.count

    def compute(self) -> Tensor:
        """Area under the mean curve on [0, 1]; NaN when nothing was scored."""
        if self.count == 0:
            return torch.tensor(float("nan"))
        c = self.curve_sum / self.count
        return ((c[:-1] + c[1:]) / 2).mean().float()


class Deletion(CausalFidelity):
    """Deletion AUC: remove the most important pixels first; a fast drop (low AUC) is better."""

    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(mode="deletion", **kwargs)


class Insertion(CausalFidelity):
    """Insertion AUC: reveal the most important pixels first; a fast rise (high AUC) is better."""

    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(mode="insertion", **kwargs)


class MuFidelity(SampleMean):
    """MuFidelity (Bhatt et al. 2020): explanation mass of random subsets vs the score they carry.

    For each of ``nb_samples`` random subsets ``S`` (each cell of a ``grid_size²`` grid joins
    ``S`` with probability ``subset_percent``; cells upsampled *nearest* to the image), the
    image's pixels in ``S`` are set to ``baseline``; per image, the Spearman correlation between
    ``Σ_{p∈S} φ_p`` and the score drop ``f(x) − f(x_S)``, averaged over images (a constant
    drop or mass gives 0, as Xplique). Higher is better.

    The subsets are drawn once from ``torch.Generator().manual_seed(seed)`` and shared by every
    image (Xplique draws per batch): each image's value is then independent of batching, device
    and DDP sharding, and of the epoch, so curves over training compare.

    Args:
        grid_size: cells per side (Xplique default 9); the image side gives pixel-wise subsets.
        subset_percent: probability that a cell is in a subset (default 0.2).
        nb_samples: subsets per image (default 200).
        baseline: value of the removed pixels (default 0.0).
        activation: ``None`` (raw logit), ``softmax`` or ``sigmoid``.
        seed: seed of the subsets.
        batch_size: perturbed images per forward.
    """

    needs = ("model", "inputs", "targets", "explanations")
    higher_is_better = True

    def __init__(
        self,
        grid_size: int = 9,
        subset_percent: float = 0.2,
        nb_samples: int = 200,
        baseline: float = 0.0,
        activation: Activation | None = None,
        seed: int = 0,
        batch_size: int = 256,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if int(grid_size) < 1 or int(nb_samples) < 2 or int(batch_size) < 1:
            raise ValueError(f"need grid_size >= 1, nb_samples >= 2, batch_size >= 1; got {grid_size}, {nb_samples}, {batch_size}")
        _check_fraction("subset_percent", subset_percent)
        self.grid_size, self.subset_percent, self.nb_samples = int(grid_size), float(subset_percent), int(nb_samples)
        self.baseline, self.activation, self.seed, self.batch_size = float(baseline), activation, int(seed), int(batch_size)
        generator = torch.Generator().manual_seed(self.seed)
        draws = torch.rand(self.nb_samples, 1, self.grid_size, self.grid_size, generator=generator)
        self._removed = (draws < self.subset_percent).float()  # 1 = the cell is set to baseline

    def removed_masks(self, size: tuple[int, int], device: torch.device) -> Tensor:
        """``(nb_samples, 1, H, W)`` masks, 1 where a pixel is set to the baseline."""
        return F.interpolate(self._removed.to(device), size=size, mode="nearest-exact")

    def correlations(self, model: nn.Module, inputs: Tensor, targets: Tensor, explanations: Tensor) -> Tensor:
        """Per-image correlations ``(N,)``."""
        targets = check_batch(inputs, targets)
        n, nb, size = len(inputs), self.nb_samples, tuple(inputs.shape[-2:])
        phi = as_map(explanations, size).to(inputs.device).flatten(1)
        removed = self.removed_masks(size, inputs.device)

        def perturbed(part: slice) -> tuple[Tensor, Tensor]:
            flat = torch.arange(part.start, part.stop, device=inputs.device)
            i, s = flat // (nb + 1), flat % (nb + 1) - 1  # s = -1: the unperturbed image
            drop = removed[s.clamp_min(0)] * (s >= 0).view(-1, 1, 1, 1)
            return inputs[i] * (1 - drop) + drop * self.baseline, targets[i]

        scores = batched_scores(model, perturbed, n * (nb + 1), self.batch_size, self.activation).view(n, nb + 1)
        score_drop = scores[:, :1] - scores[:, 1:]
        mass = phi.double() @ removed.flatten(1).double().T  # (N, nb): Σ φ over each subset
        return spearman_rows(score_drop.double().cpu(), mass.cpu())

    def update(self, model: nn.Module, inputs: Tensor, targets: Tensor, explanations: Tensor) -> None:
        """Add the correlations of a batch."""
        if len(inputs):
            self.add(self.correlations(model, inputs, targets, explanations))
