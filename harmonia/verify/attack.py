"""The empirical side of the bounds: a PGD attack on the same perturbation sets.

For each image, class ``c`` and other class ``k``, projected gradient ascent (Madry et al., ICLR
2018) on ``f_k(x + δ) − f_c(x + δ)`` over ``|δ_i| ≤ ε·mask_i`` (an L∞ ball, optionally restricted
to a region: δ is 0 where the mask is 0). The best value seen along the path of any restart is
a value the network really reaches, so every sound upper bound is at least it: the gap between
the two is how loose the bound is, and a bound below it is a bug.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from harmonia.explain.base import chunks, gradients_on
from harmonia.verify.bounds import box_radius


def pgd_margins(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    epsilon: float | Tensor,
    mask: Tensor | None = None,
    steps: int = 40,
    restarts: int = 2,
    step_size: float | None = None,
    classes: Tensor | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> Tensor:
    """Largest ``f_k(x + δ) − f_target(x + δ)`` found per class: ``(N, K)`` (the target's column is 0).

    Args:
        epsilon: L∞ radius, a number or ``(N,)``.
        mask: ``(N, 1|C, H, W)``, 1 where pixels may move (default: everywhere).
        steps: gradient-sign steps per restart; ``step_size`` defaults to ``2.5 ε / steps``.
        restarts: the first starts at ``x``, the others at uniform points of the set.
        classes: ``(N, K)`` bool, which ``k`` to attack (default: all but the target); the
            others get ``-inf``.
        batch_size: attacked copies per forward. Deterministic given ``seed``.

    Never changes the model's mode and leaves no ``.grad`` on its parameters.
    """
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be >= 1; got {steps}, {restarts}")
    target = target.to(x.device).long()
    radius = box_radius(x.detach(), epsilon, mask)
    with torch.no_grad():
        num_classes = model(x[:1]).shape[1]
    n = len(x)
    if classes is None:
        classes = torch.ones(n, num_classes, dtype=torch.bool, device=x.device)
    classes = classes.clone()
    classes[torch.arange(n), target] = False
    image, klass = classes.nonzero(as_tuple=True)
    best = torch.full((n, num_classes), -torch.inf, dtype=x.dtype, device=x.device)
    best[torch.arange(n), target] = 0.0
    generator = torch.Generator(device="cpu").manual_seed(seed)
    total = len(image) * restarts
    copy_image = image.repeat(restarts)
    copy_class = klass.repeat(restarts)
    copy_restart = torch.arange(restarts, device=x.device).repeat_interleave(len(image))
    noise = (torch.rand((total, *x.shape[1:]), generator=generator) * 2 - 1).to(x.device, x.dtype)
    for part in chunks(total, batch_size):
        i, k, start = copy_image[part], copy_class[part], copy_restart[part]
        r = radius[i]
        alpha = r * (2.5 / steps) if step_size is None else torch.where(r > 0, torch.full_like(r, step_size), r)
        delta = torch.where((start > 0).view(-1, *([1] * (x.dim() - 1))), noise[part] * r, torch.zeros_like(r))
        c = target[i]
        found = torch.full((len(i),), -torch.inf, dtype=x.dtype, device=x.device)
        for step in range(steps + 1):
            with gradients_on():
                delta = delta.detach().requires_grad_(True)
                logits = model(x[i].detach() + delta)
                value = logits.gather(1, k[:, None]).squeeze(1) - logits.gather(1, c[:, None]).squeeze(1)
                found = torch.maximum(found, value.detach())
                if step == steps:
                    break
                (grad,) = torch.autograd.grad(value.sum(), delta)
            delta = torch.maximum(torch.minimum(delta.detach() + alpha * grad.sign(), r), -r)
        _scatter_max(best, i, k, found)
    return best


def _scatter_max(best: Tensor, rows: Tensor, cols: Tensor, values: Tensor) -> None:
    """``best[rows, cols] = max(best[rows, cols], values)`` with repeated indices (restarts)."""
    flat = best.view(-1)
    flat.scatter_reduce_(0, rows * best.shape[1] + cols, values, reduce="amax")


def pgd_overlap(model: nn.Module, x: Tensor, target: Tensor, epsilon: float | Tensor, mask: Tensor | None = None,
                **kwargs) -> Tensor:
    """Largest adversarial overlap ``max_{k≠c} f_k − f_c`` found by :func:`pgd_margins`: ``(N,)``."""
    from harmonia.verify.bounds import overlap

    return overlap(pgd_margins(model, x, target, epsilon, mask, **kwargs), target.to(x.device).long())
