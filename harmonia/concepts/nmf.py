"""Non-negative matrix factorization in PyTorch: ``A ≈ U W`` on whatever device ``A`` lives on.

Why not scikit-learn: CRAFT factorizes activations that live on the GPU during training, and
scikit-learn's ``NMF`` runs on CPU NumPy only (the xplique reference pays a device round trip
for it). The maintained GPU NMF packages are either unmaintained (nmf-torch, torchnmf) or part
of a much larger toolbox (overcomplete). The algorithm is small, so it is written here with
scikit-learn's semantics, which is what CRAFT's reference calls
(``NMF(n_components, alpha_W=1e-2)``), so numbers compare:

- objective ``½‖A − UW‖²_F + ½·α·m·‖U‖²_F + ½·α·n·‖W‖²_F`` for ``A`` of shape ``(n, m)``
  (scikit-learn's ``alpha_W`` with ``alpha_H="same"`` and ``l1_ratio=0``: each penalty is
  scaled by the size of the *other* dimension);
- solver: HALS, i.e. exact coordinate descent one column of ``U`` (row of ``W``) at a time.
  Rows are independent within a column update, so one vectorized update per component equals
  scikit-learn's element-by-element ``cd`` solver (without shuffling);
- stopping: the summed projected-gradient "violation" of an iteration, relative to the first
  iteration's, falls below ``tol`` (scikit-learn's rule), or ``max_iter`` iterations;
- initialization ``nndsvda`` (Boutsidis & Gallopoulos 2008, zeros filled with the mean of
  ``A``) from an exact SVD, hence deterministic without a seed; ``random`` draws from a seeded
  CPU generator so the same seed gives the same start on every device. ``auto`` picks
  ``nndsvda`` when ``k ≤ min(n, m)``, else ``random`` (scikit-learn's default rule).

Tested against scikit-learn's reconstruction error in tests/test_concepts.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from harmonia.runtime import single_cpu_thread

Init = Literal["auto", "nndsvda", "random"]


@dataclass
class NMFResult:
    """``A ≈ coefficients @ components``: ``(n, k)`` and ``(k, m)``, both ≥ 0."""

    coefficients: Tensor
    components: Tensor
    iterations: int
    error: float  # ‖A − UW‖_F


def _check(a: Tensor, what: str) -> None:
    if a.ndim != 2:
        raise ValueError(f"{what} must be a 2-D matrix, got shape {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    if (a < 0).any():
        raise ValueError(f"{what} has negative entries (min {float(a.min()):.4g}); NMF needs a non-negative matrix")


def _nndsvda(a: Tensor, k: int, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """NNDSVD start from the ``k`` leading singular triplets; zeros become the mean of ``a``."""
    left, singular, right = torch.linalg.svd(a, full_matrices=False)
    u = torch.zeros(a.shape[0], k, dtype=a.dtype, device=a.device)
    w = torch.zeros(k, a.shape[1], dtype=a.dtype, device=a.device)
    # The leading triplet of a non-negative matrix is non-negative up to a common sign.
    u[:, 0] = singular[0].sqrt() * left[:, 0].abs()
    w[0] = singular[0].sqrt() * right[0].abs()
    for j in range(1, k):
        x, y = left[:, j], right[j]
        xp, yp, xn, yn = x.clamp_min(0), y.clamp_min(0), (-x).clamp_min(0), (-y).clamp_min(0)
        mp, mn = xp.norm() * yp.norm(), xn.norm() * yn.norm()
        # Keep the sign pattern with more mass; a triplet's joint sign flip leaves this unchanged.
        x, y, sigma = (xp, yp, mp) if mp > mn else (xn, yn, mn)
        scale = (singular[j] * sigma).sqrt()
        u[:, j] = scale * x / x.norm().clamp_min(1e-30)
        w[j] = scale * y / y.norm().clamp_min(1e-30)
    u[u < eps] = 0
    w[w < eps] = 0
    mean = a.mean()
    return u.masked_fill(u == 0, mean), w.masked_fill(w == 0, mean)


def _random(a: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """``|N(0,1)|·sqrt(mean(a)/k)`` from a seeded CPU generator (same start on every device)."""
    generator = torch.Generator().manual_seed(seed)
    scale = (a.mean() / k).sqrt().cpu()
    w = (torch.randn(k, a.shape[1], generator=generator, dtype=a.dtype).abs() * scale).to(a.device)
    u = (torch.randn(a.shape[0], k, generator=generator, dtype=a.dtype).abs() * scale).to(a.device)
    return u, w


def _sweep(rows: Tensor, target: Tensor, gram: Tensor) -> Tensor:
    """One HALS sweep over the ``k`` rows of a factor (in place); returns the summed violation.

    The factor is stored as ``rows (k, n)`` (``Uᵀ`` or ``W``), ``target = W Aᵀ`` (or ``Uᵀ A``)
    and ``gram = W Wᵀ + λ I`` (or ``UᵀU + λ I``). Row ``t`` moves by ``−grad_t / gram_tt``,
    clipped at 0, where ``grad_t = gram_t · rows − target_t``; rows are updated one after the
    other so each sees the previous ones' new values (Gauss–Seidel, like scikit-learn's ``cd``).
    Rows are contiguous and each step is a handful of fused ops: the solver's cost is
    per-operation overhead, not arithmetic, at CRAFT's sizes.
    """
    violations = []
    for t, h in enumerate(gram.diagonal().tolist()):
        row = rows[t]
        grad = torch.addmv(target[t], rows.T, gram[t], beta=-1)
        # Projected gradient: at a zero coefficient only a descent direction into the
        # feasible set counts (scikit-learn's violation).
        violations.append(torch.linalg.vector_norm(torch.where(row == 0, grad.clamp_max(0), grad), 1))
        if h != 0:
            row.sub_(grad, alpha=1 / h).clamp_min_(0)
    return torch.stack(violations).sum()


def _solve(
    a: Tensor, ut: Tensor, w: Tensor, alpha: float, update_w: bool, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, int]:
    with single_cpu_thread(a.device):
        return _iterate(a, ut, w, alpha, update_w, max_iter, tol)


def _iterate(
    a: Tensor, ut: Tensor, w: Tensor, alpha: float, update_w: bool, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, int]:
    """HALS sweeps on ``Uᵀ (k, n)`` and ``W (k, m)`` until scikit-learn's relative-violation rule."""
    n, m = a.shape
    eye = torch.eye(ut.shape[0], dtype=a.dtype, device=a.device)
    reg_u, reg_w = alpha * m, alpha * n
    first = None
    iteration = 0
    for iteration in range(1, max_iter + 1):
        violation = _sweep(ut, w @ a.T, w @ w.T + reg_u * eye)
        if update_w:
            violation = violation + _sweep(w, ut @ a, ut @ ut.T + reg_w * eye)
        value = float(violation)  # one device sync per iteration, as the stopping rule needs it
        if first is None:
            first = value
        if first == 0 or value / first <= tol:
            break
    return ut, w, iteration


def nmf(
    a: Tensor,
    n_components: int,
    alpha_W: float = 1e-2,
    max_iter: int = 200,
    tol: float = 1e-4,
    init: Init = "auto",
    seed: int = 0,
) -> NMFResult:
    """Factorize a non-negative ``(n, m)`` matrix as ``U (n, k) @ W (k, m)`` (see module doc).

    Runs on ``a``'s device and dtype. ``alpha_W`` is scikit-learn's regularization strength
    (CRAFT's reference uses 1e-2). Raises ``ValueError`` on negative or non-finite input.
    """
    _check(a, "the matrix to factorize")
    if not 1 <= n_components:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    if init == "auto":
        init = "nndsvda" if n_components <= min(a.shape) else "random"
    if init == "nndsvda":
        if n_components > min(a.shape):
            raise ValueError(f"nndsvda needs n_components <= min{tuple(a.shape)}; got {n_components} (use init='random')")
        u, w = _nndsvda(a, n_components)
    elif init == "random":
        u, w = _random(a, n_components, seed)
    else:
        raise ValueError(f"unknown init {init!r}; use 'auto', 'nndsvda' or 'random'")
    ut, w, iterations = _solve(a, u.T.contiguous(), w.contiguous(), alpha_W, True, max_iter, tol)
    return NMFResult(ut.T, w, iterations, float((a - ut.T @ w).norm()))


def nmf_transform(
    a: Tensor, components: Tensor, alpha_W: float = 1e-2, max_iter: int = 200, tol: float = 1e-4
) -> Tensor:
    """Coefficients ``U ≥ 0`` of new rows ``a (n, m)`` on fixed ``components (k, m)``.

    scikit-learn's ``NMF.transform``: the same regularized objective solved for ``U`` only,
    starting from zeros. With ``alpha_W > 0`` the problem is strictly convex, so the answer does
    not depend on how rows are batched (up to the stopping tolerance).
    """
    _check(a, "the activations to transform")
    if components.ndim != 2 or components.shape[1] != a.shape[1]:
        raise ValueError(f"components of shape {tuple(components.shape)} do not match rows of width {a.shape[1]}")
    components = components.to(device=a.device, dtype=a.dtype)
    ut = a.new_zeros(components.shape[0], a.shape[0])
    ut, _, _ = _solve(a, ut, components, alpha_W, False, max_iter, tol)
    return ut.T
