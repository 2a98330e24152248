"""Integrated Gradients (Sundararajan et al. 2017) with its completeness error."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from harmonia.explain.base import (
    Explainer,
    Reduction,
    batched_gradients,
    batched_scores,
    check_batch,
    check_reduction,
    reduce_channels,
)

Rule = Literal["trapezoid", "left", "right", "middle"]
RULES: tuple[str, ...] = ("trapezoid", "left", "right", "middle")


def path_weights(steps: int, rule: Rule) -> tuple[Tensor, Tensor]:
    """Points ``α_k`` on [0, 1] and weights ``w_k`` with ``Σ_k w_k g(α_k) ≈ ∫_0^1 g(α) dα``.

    ``trapezoid`` (Xplique's rule): ``steps`` points ``linspace(0, 1, steps)`` with half weights
    at both ends; ``left``/``right``/``middle``: the Riemann sums on ``steps`` equal cells.
    """
    if rule not in RULES:
        raise ValueError(f"unknown integration rule {rule!r}; use one of {RULES}")
    if rule == "trapezoid":
        if steps < 2:
            raise ValueError(f"the trapezoid rule needs steps >= 2; got {steps}")
        alphas = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
        weights = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
        weights[[0, -1]] /= 2
        return alphas, weights
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    offset = {"left": 0.0, "right": 1.0, "middle": 0.5}[rule]
    alphas = (torch.arange(steps, dtype=torch.float64) + offset) / steps
    return alphas, torch.full((steps,), 1.0 / steps, dtype=torch.float64)


class IntegratedGradients(Explainer):
    """Integrated Gradients from a constant baseline along the straight path.

    ``IG_c(x) = (x − b)_c · Σ_k w_k ∂ logit_y(b + α_k (x − b)) / ∂x_c`` (``path_weights``), then
    a channel reduction. Completeness says ``Σ_{c,h,w} IG = logit_y(x) − logit_y(b)``;
    ``attribute_with_error`` returns how far the finite sum is from it.

    Args:
        steps: points on the path (Xplique default 50).
        baseline: value of the baseline image ``b`` (Xplique default 0: black in [0, 1]).
        rule: quadrature rule; default ``trapezoid`` as Xplique.
        reduction: default ``sum`` (deviation from Xplique's ``mean``: the same ranking, scaled
            by the channel count, and the map then sums to ``logit(x) − logit(b)``).
        batch_size: path points per forward/backward.
    """

    def __init__(
        self,
        steps: int = 50,
        baseline: float = 0.0,
        rule: Rule = "trapezoid",
        reduction: Reduction = "sum",
        batch_size: int = 64,
    ) -> None:
        super().__init__(batch_size)
        path_weights(int(steps), rule)  # validates steps and rule
        self.steps, self.baseline, self.rule, self.reduction = int(steps), float(baseline), rule, check_reduction(reduction)

    def _per_channel(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        """``(N,C,H,W)`` attributions before the channel reduction."""
        alphas, weights = path_weights(self.steps, self.rule)
        alphas, weights = alphas.to(x.device, x.dtype), weights.to(x.device, torch.float32)
        base = torch.full_like(x, self.baseline)
        steps = self.steps
        image = torch.arange(len(x) * steps, device=x.device) // steps
        point = torch.arange(len(x) * steps, device=x.device) % steps

        def on_path(part: slice) -> tuple[Tensor, Tensor]:
            n, k = image[part], point[part]
            a = alphas[k].view(-1, 1, 1, 1)
            return base[n] + a * (x[n] - base[n]), target[n]

        total = torch.zeros_like(x, dtype=torch.float32)
        for part, grad in batched_gradients(model, on_path, len(x) * steps, self.batch_size):
            total.index_add_(0, image[part], grad.float() * weights[point[part]].view(-1, 1, 1, 1))
        return (x - base).float() * total

    def _attribute(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        return reduce_channels(self._per_channel(model, x, target), self.reduction)

    def attribute_with_error(self, model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(maps (N,1,H,W), completeness error (N,))``.

        The error is ``Σ_{c,h,w} IG − (logit_y(x) − logit_y(b))`` per image, whatever the
        channel reduction of the maps: it measures the quadrature, not the display.
        """
        target = check_batch(x, target)
        if len(x) == 0:
            return x.new_zeros(0, 1, *x.shape[-2:]), x.new_zeros(0)
        with torch.inference_mode(False):
            x, target = (t.clone() if t.is_inference() else t for t in (x, target))
            per_channel = self._per_channel(model, x, target)
            ends, targets = torch.cat([x, torch.full_like(x, self.baseline)]), torch.cat([target, target])
            scores = batched_scores(model, lambda s: (ends[s], targets[s]), len(ends), self.batch_size)
            gap = scores[: len(x)] - scores[len(x) :]
            error = per_channel.sum(dim=(1, 2, 3)) - gap.to(per_channel.device)
            return reduce_channels(per_channel, self.reduction), error
