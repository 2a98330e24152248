"""EVA (Fel, Ducoffe et al., CVPR 2023): attributions from verified perturbation analysis.

For an image ``x`` of class ``c`` and the L∞ ball ``B`` of radius ε around it, the adversarial
overlap ``AO(x, B) = max_{δ∈B, k≠c} f_k(x+δ) − f_c(x+δ)`` is bounded from above by a sound
verifier (``harmonia.verify.bounds``). A grid cell ``u``'s importance is
``AO(x, B) − AO(x, B∖u)``, where ``B∖u`` is ``B`` with ``u``'s pixels held at their value: how
much the worst case the ball allows shrinks once that region may no longer move.

Cost: with ``shared_relaxation=True`` (default) the bound on ``B`` is computed once per image
(one CROWN pass plus its intermediate bounds), and every ``B∖u`` reuses its linear
relaxations: they are valid on ``B``, hence on every subset of it, and only the final
maximization over the smaller box changes. That keeps every ``AO(x, B∖u)`` a sound bound for
about the cost of one. ``shared_relaxation=False`` recomputes all bounds for each ``B∖u``
(tighter, ``grid² + 1`` times the cost).

Since ``B∖u ⊂ B``, ``AO(x, B)`` also bounds ``AO(x, B∖u)``; the minimum is taken, so every
importance is ≥ 0, and a region that no logit can see gets exactly 0.

Which bounds are compared (``importance``): by default CROWN's. The Lipschitz caps of a
1-Lipschitz network often bound the overlap more tightly, but they depend on a region's size
alone, so where they win every equal-size region would get the same importance; the caps still
give the verified overlaps (:meth:`EVA.overlaps`) and the certified radii (:class:`CertifiedRegions`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.explain.base import Explainer, check_positive, chunks
from harmonia.verify.bounds import (
    METHODS,
    BoundedNetwork,
    BoundState,
    Intermediate,
    MarginBound,
    Method,
    box_radius,
    lipschitz_reach,
    overlap,
)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def cell_index(grid_size: int, height: int, width: int, device: torch.device | None = None) -> Tensor:
    """``(H, W)`` index of the ``grid × grid`` cell of each pixel (nearest, as the upsampled maps)."""
    cells = torch.arange(grid_size * grid_size, dtype=torch.float32).view(1, 1, grid_size, grid_size)
    return F.interpolate(cells, size=(height, width), mode="nearest-exact").long().view(height, width).to(device)


def cell_masks(grid_size: int, height: int, width: int, device: torch.device | None = None) -> Tensor:
    """``(grid², 1, H, W)`` 0/1 masks of the cells."""
    index = cell_index(grid_size, height, width, device)
    return F.one_hot(index, grid_size * grid_size).permute(2, 0, 1).unsqueeze(1).float()


class _VerifiedExplainer(Explainer):
    """Shared options of the explainers built on the bounds."""

    def __init__(
        self,
        grid_size: int = 8,
        method: Method = "crown",
        intermediate: Intermediate = "crown",
        crown_max_neurons: int | None = 2048,
        dtype: Literal["float32", "float64"] = "float32",
        use_certificate: bool = True,
        batch_size: int = 16,
        alpha_steps: int = 20,
        alpha_lr: float = 0.2,
    ) -> None:
        super().__init__(batch_size)
        check_positive(grid_size=grid_size, alpha_lr=alpha_lr)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        if alpha_steps < 0:
            raise ValueError(f"alpha_steps must be >= 0; got {alpha_steps}")
        self.alpha_steps, self.alpha_lr = int(alpha_steps), float(alpha_lr)
        if intermediate not in ("ibp", "crown"):
            raise ValueError(f"intermediate must be 'ibp' or 'crown'; got {intermediate!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
        if crown_max_neurons is not None and crown_max_neurons < 0:
            raise ValueError(f"crown_max_neurons must be >= 0 or None; got {crown_max_neurons}")
        self.grid_size, self.method, self.intermediate = int(grid_size), method, intermediate
        self.crown_max_neurons, self.dtype, self.use_certificate = crown_max_neurons, dtype, use_certificate

    def network(self, model: nn.Module, x: Tensor) -> BoundedNetwork:
        """The model read for bounding (weights as it computes them now)."""
        return BoundedNetwork(model, tuple(x.shape[1:]), DTYPES[self.dtype], self.use_certificate)

    def _check_grid(self, x: Tensor) -> None:
        h, w = x.shape[-2:]
        if self.grid_size > min(h, w):
            raise ValueError(f"grid_size {self.grid_size} is larger than the {h}×{w} image")

    def _bounds(self, net: BoundedNetwork, x: Tensor, target: Tensor, radius: Tensor) -> Tensor:
        """Upper bounds ``(B, K)`` of the logit differences on the boxes ``x ± radius``."""
        state = net.bound(x - radius, x + radius, self.intermediate, self.crown_max_neurons)
        return self._margins(net, state, target).upper(radius)

    def _margins(self, net: BoundedNetwork, state: BoundState, target: Tensor) -> MarginBound:
        """The logit-difference bounds of ``state``'s boxes by this explainer's method."""
        return net.margins(state, target, self.method, self.alpha_steps, self.alpha_lr)


class EVA(_VerifiedExplainer):
    """EVA: verified importance of grid cells, AO(x, B) − AO(x, B∖u), upsampled to the image.

    Args:
        epsilon: L∞ radius of the ball B, on the model's input scale (images in [0, 1]).
        grid_size: cells per side (the regions u).
        method: ``crown`` (linear relaxation, default), ``alpha-crown`` (the same with its
            relaxations optimized for each image and class, ``alpha_steps`` Adam steps of rate
            ``alpha_lr``: tighter, about ``alpha_steps`` times the final pass's cost) or ``ibp``
            (interval bounds only; ranks regions poorly, for comparison).
        intermediate: bounds of the hidden layers: ``crown`` (default; for layers with at most
            ``crown_max_neurons`` quantities per image, ``None`` for all) or ``ibp``.
        shared_relaxation: reuse the relaxations of B for every B∖u (see the module docstring).
        importance: which verified bounds the importance compares (default ``crown`` with
            ``method`` ``crown``/``alpha-crown``, else ``tightest``): ``crown``, the linear
            (CROWN or α-CROWN) bounds of ``AO(x, B)`` and
            ``AO(x, B∖u)``; ``tightest``, the minimum of CROWN, interval bounds and the Lipschitz
            caps. Both are differences of sound bounds. The caps depend on a region's size only,
            so wherever they are the tightest bound every equal-size region gets the same
            importance (measured on the digits model at ε = 0.03: constant maps); CROWN's linear
            coefficients rank regions as an attack does even where the caps are tighter
            (benchmarks/eva_cost.py). :meth:`overlaps` and :class:`CertifiedRegions` always use
            the tightest bounds.
        dtype: arithmetic of the bounds.
        use_certificate: cap bounds with a 1-Lipschitz model's ``certificate``.
        batch_size: images bounded at once.
        alpha_steps, alpha_lr: α-CROWN's optimization (``method="alpha-crown"`` only).
    """

    def __init__(
        self,
        epsilon: float = 0.03,
        grid_size: int = 8,
        method: Method = "crown",
        intermediate: Intermediate = "crown",
        crown_max_neurons: int | None = 2048,
        shared_relaxation: bool = True,
        importance: Literal["crown", "tightest"] | None = None,
        dtype: Literal["float32", "float64"] = "float32",
        use_certificate: bool = True,
        batch_size: int = 16,
        alpha_steps: int = 20,
        alpha_lr: float = 0.2,
    ) -> None:
        super().__init__(grid_size, method, intermediate, crown_max_neurons, dtype, use_certificate, batch_size,
                         alpha_steps, alpha_lr)
        check_positive(epsilon=epsilon)
        linear = method in ("crown", "alpha-crown")
        importance = importance or ("crown" if linear else "tightest")
        if importance not in ("crown", "tightest"):
            raise ValueError(f"importance must be 'crown' or 'tightest'; got {importance!r}")
        if importance == "crown" and not linear:
            raise ValueError("importance='crown' needs method='crown' or 'alpha-crown'")
        self.epsilon = float(epsilon)
        self.shared_relaxation = bool(shared_relaxation)
        self.importance = importance

    def _attribute(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        cells = self.region_importance(model, x, target)
        h, w = x.shape[-2:]
        index = cell_index(self.grid_size, h, w, x.device)
        return cells.flatten(1)[:, index].unsqueeze(1).to(x.dtype)

    def region_importance(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        """``(N, grid, grid)``: ``AO(x, B) − AO(x, B∖u)`` per cell ``u``."""
        self._check_grid(x)
        net = self.network(model, x)
        out = [self._importance(net, x[part], target[part]) for part in chunks(len(x), self.batch_size)]
        g = self.grid_size
        return torch.cat(out).view(len(x), g, g)

    def overlaps(self, model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(AO(x, B) (N,), AO(x, B∖u) (N, grid²))``: the tightest verified overlaps (every bound, caps included)."""
        self._check_grid(x)
        net = self.network(model, x)
        parts = [self._overlaps(net, x[p], target[p]) for p in chunks(len(x), self.batch_size)]
        return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])

    def _importance(self, net: BoundedNetwork, x: Tensor, target: Tensor) -> Tensor:
        full, regions = self._overlaps(net, x, target, tightest=self.importance == "tightest")
        return (full.unsqueeze(1) - regions).clamp_min(0)

    def _overlaps(self, net: BoundedNetwork, x: Tensor, target: Tensor, tightest: bool = True) -> tuple[Tensor, Tensor]:
        """``AO(x, B)`` ``(N,)`` and ``AO(x, B∖u)`` ``(N, G²)``: from every bound (``tightest``) or CROWN's alone."""
        xs = x.detach().to(net.dtype)
        n, g2 = len(xs), self.grid_size**2
        radius = box_radius(xs, self.epsilon)
        masks = cell_masks(self.grid_size, *xs.shape[-2:], xs.device).to(net.dtype)  # (G², 1, H, W)
        state = net.bound(xs - radius, xs + radius, self.intermediate, self.crown_max_neurons)
        margins = self._margins(net, state, target)
        full = margins.upper(radius) if tightest else _linear_upper(margins, radius)  # (N, K)
        if self.shared_relaxation and margins.coef is not None:
            # Sub-box radii ε·(1 − mask_u), evaluated without forming them: Σ_{i∉u} |a_i| = Σ|a| − Σ_{i∈u}|a|.
            coef = margins.coef.abs().sum(2)  # (N, K, H, W): channels of a pixel move together
            per_cell = coef.flatten(2) @ masks.flatten(1).T  # (N, K, G²)
            regions = margins.linear_at_center().unsqueeze(2) + self.epsilon * (coef.flatten(2).sum(2, keepdim=True) - per_cell)
            if tightest:
                free = xs[0].numel() - masks.flatten(1).sum(1) * xs.shape[1]  # moving coordinates per B∖u
                cap = margins.margin.unsqueeze(2) + lipschitz_reach(margins.lipschitz.unsqueeze(2), self.epsilon * free.sqrt())
                regions = torch.minimum(regions, cap)
            regions = regions.transpose(1, 2)  # (N, G², K)
        else:
            sub = (radius.unsqueeze(1) * (1 - masks).unsqueeze(0)).flatten(0, 1)  # (N·G², C, H, W)
            rows = torch.arange(n, device=xs.device).repeat_interleave(g2)
            parts = []
            for part in chunks(len(rows), max(1, self.batch_size)):
                i, r = rows[part], sub[part]
                if tightest:
                    parts.append(self._bounds(net, xs[i], target[i], r))
                else:
                    sub_state = net.bound(xs[i] - r, xs[i] + r, self.intermediate, self.crown_max_neurons)
                    parts.append(_linear_upper(self._margins(net, sub_state, target[i]), r))
            regions = torch.cat(parts).view(n, g2, -1)
        regions = torch.minimum(regions, full.unsqueeze(1))  # B∖u ⊂ B
        return overlap(full, target), _overlap_rows(regions, target)


def _linear_upper(margins: MarginBound, radius: Tensor) -> Tensor:
    """CROWN's bound alone on the box ``center ± radius`` ``(B, K)`` (the target's column 0)."""
    flat = margins.coef.abs().flatten(2)  # (B, K, D)
    bound = margins.linear_at_center() + (flat @ radius.flatten(1).to(flat.dtype).unsqueeze(2)).squeeze(2)
    return bound.scatter(1, margins.target.view(-1, 1), 0.0)


def _overlap_rows(bounds: Tensor, target: Tensor) -> Tensor:
    """``max_{k≠c}`` over the last axis of ``(N, R, K)`` bounds: ``(N, R)``."""
    mask = F.one_hot(target, bounds.shape[-1]).bool().unsqueeze(1)
    return bounds.masked_fill(mask, -torch.inf).amax(-1)


class CertifiedRegions(_VerifiedExplainer):
    """Per grid cell, the largest L∞ radius for which the prediction is certified when only that cell may change.

    Found by bisection on the verified bounds (each step bounds every cell of every image in
    one batch); the map is the certified radius, upsampled to the image (nearest). A *small*
    radius marks a region where little change can flip the decision: negate the map to rank
    regions by fragility with the fidelity metrics. 0 where the target is not the prediction.

    Args:
        max_epsilon: the search stops there (reported when certified even at it).
        steps: bisection steps (resolution ``max_epsilon / 2**steps``).
        Others as :class:`EVA`.
    """

    def __init__(
        self,
        grid_size: int = 8,
        max_epsilon: float = 1.0,
        steps: int = 10,
        method: Method = "crown",
        intermediate: Intermediate = "crown",
        crown_max_neurons: int | None = 2048,
        dtype: Literal["float32", "float64"] = "float32",
        use_certificate: bool = True,
        batch_size: int = 64,
        alpha_steps: int = 20,
        alpha_lr: float = 0.2,
    ) -> None:
        super().__init__(grid_size, method, intermediate, crown_max_neurons, dtype, use_certificate, batch_size,
                         alpha_steps, alpha_lr)
        check_positive(max_epsilon=max_epsilon, steps=steps)
        self.max_epsilon, self.steps = float(max_epsilon), int(steps)

    def _attribute(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        radii = self.region_radii(model, x, target)
        index = cell_index(self.grid_size, *x.shape[-2:], x.device)
        return radii.flatten(1)[:, index].unsqueeze(1).to(x.dtype)

    def region_radii(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        """``(N, grid, grid)`` certified L∞ radii, one per cell."""
        self._check_grid(x)
        net = self.network(model, x)
        xs = x.detach().to(net.dtype)
        n, g = len(xs), self.grid_size
        masks = cell_masks(g, *xs.shape[-2:], xs.device).to(net.dtype)
        rows = torch.arange(n, device=xs.device).repeat_interleave(g * g)
        cell = torch.arange(g * g, device=xs.device).repeat(n)
        total = len(rows)

        def certified(eps: Tensor, which: Tensor) -> Tensor:
            """Whether each box ``which`` (indices) is certified at its radius ``eps``."""
            out = []
            for part in chunks(len(which), self.batch_size):
                j = which[part]
                i = rows[j]
                radius = eps[part].view(-1, 1, 1, 1) * masks[cell[j]].expand(-1, *xs.shape[1:])
                out.append(overlap(self._bounds(net, xs[i], target[i], radius), target[i]) < 0)
            return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=xs.device)

        everything = torch.arange(total, device=xs.device)
        low = torch.zeros(total, dtype=net.dtype, device=xs.device)
        high = torch.full_like(low, self.max_epsilon)
        ok = certified(low, everything)  # at radius 0: the target is the strict prediction
        candidates = everything[ok]
        at_max = certified(high[candidates], candidates)
        low[candidates[at_max]] = self.max_epsilon
        active = candidates[~at_max]
        for _ in range(self.steps):
            if not len(active):
                break
            mid = (low[active] + high[active]) / 2
            good = certified(mid, active)
            low[active[good]] = mid[good]
            high[active[~good]] = mid[~good]
        return low.view(n, g, g)
