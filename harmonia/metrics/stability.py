"""Average stability: do nearby inputs get nearby explanations? (Bhatt et al. 2020)"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from harmonia.explain.base import Explainer, check_batch
from harmonia.metrics.base import SampleMean, as_map

Distance = Literal["l2", "l1", "squared_l2"]


class AverageStability(SampleMean):
    """Mean distance between the explanation of ``x`` and those of ``x + u_s``, ``s = 1..nb_samples``.

    ``u_s`` is uniform in ``[0, radius)`` per input value (one-sided, as Xplique), drawn once
    per input shape from ``torch.Generator().manual_seed(seed)`` and shared by every image, so
    an image's value does not depend on batching or DDP sharding. Lower is better.

    Xplique 2.0.2 does the same: noise uniform in ``[0, radius)`` and, for ``"l2"``, the
    Euclidean distance (the square root of the sum of squares), so ``"l2"`` (the default) gives
    its number. Both draw the offsets once and add the same ones to every image; only the
    generator differs (Xplique's is TensorFlow's global one, here a seeded one), so values agree
    up to the sampling noise, and exactly given the same offsets. ``"squared_l2"`` (the sum of
    squares, no root) is what earlier Xplique releases called ``"l2"``; those releases also drew
    the noise in ``[0, 1/D)`` (``D`` input values) whatever ``radius`` was.

    The cost is ``nb_samples`` extra explanations per image (e.g. 20 Sobol attributions).

    Args:
        radius: noise range on the model's input scale (default 0.1).
        nb_samples: neighbours per image (default 20).
        distance: ``l2`` | ``l1`` | ``squared_l2`` between explanation maps.
        seed: seed of the noise.
    """

    needs = ("model", "explainer", "inputs", "targets", "explanations")
    higher_is_better = False

    def __init__(
        self, radius: float = 0.1, nb_samples: int = 20, distance: Distance = "l2", seed: int = 0, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if not radius > 0 or int(nb_samples) < 1:
            raise ValueError(f"need radius > 0 and nb_samples >= 1; got {radius}, {nb_samples}")
        if distance not in ("l2", "l1", "squared_l2"):
            raise ValueError(f"distance must be 'l2', 'l1' or 'squared_l2'; got {distance!r}")
        self.radius, self.nb_samples, self.distance, self.seed = float(radius), int(nb_samples), distance, int(seed)

    def noise(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        """The ``(nb_samples, *shape)`` offsets added to every image."""
        generator = torch.Generator().manual_seed(self.seed)
        return (torch.rand(self.nb_samples, *shape, generator=generator) * self.radius).to(device, dtype)

    def _distance(self, a: Tensor, b: Tensor) -> Tensor:
        diff = (a - b).flatten(1).double()
        if self.distance == "l1":
            return diff.abs().sum(dim=1)
        squared = (diff * diff).sum(dim=1)
        return squared if self.distance == "squared_l2" else squared.sqrt()

    def distances(
        self, model: nn.Module, explainer: Explainer, inputs: Tensor, targets: Tensor, explanations: Tensor | None = None
    ) -> Tensor:
        """Per-image mean distance ``(N,)``; ``explanations`` of ``inputs`` are computed if not given."""
        targets = check_batch(inputs, targets)
        size = tuple(inputs.shape[-2:])
        if explanations is None:
            explanations = explainer.attribute(model, inputs, targets)
        base = as_map(explanations, size).to(inputs.device)
        u = self.noise(tuple(inputs.shape[1:]), inputs.device, inputs.dtype)
        out = []
        for i in range(len(inputs)):  # one image's neighbours at a time bounds memory
            neighbours = inputs[i : i + 1] + u
            maps = as_map(explainer.attribute(model, neighbours, targets[i].repeat(self.nb_samples)), size)
            out.append(self._distance(maps, base[i : i + 1]).mean())
        return torch.stack(out)

    def update(
        self, model: nn.Module, explainer: Explainer, inputs: Tensor, targets: Tensor, explanations: Tensor | None = None
    ) -> None:
        """Add the mean distances of a batch."""
        if len(inputs):
            self.add(self.distances(model, explainer, inputs, targets, explanations))
