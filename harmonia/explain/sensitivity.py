"""Quasi-Monte-Carlo designs and the Jansen total-order estimator (variance-based sensitivity).

Shared by Sobol attribution (masks over an image grid) and CRAFT concept importance (masks
over concept coefficients): both evaluate a model on ``nb_design · (d + 2)``
masked inputs laid out as ``[A; B; C_1; …; C_d]`` and reduce the scores with Jansen's estimator.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

Sequence = Literal["sobol", "halton"]


def qmc_design(nb_design: int, dim: int, sequence: Sequence = "sobol", skip_first: bool | None = None) -> Tensor:
    """Masks ``[A; B; C_1; …; C_d]`` of shape ``(nb_design · (dim + 2), dim)``, values in [0, 1).

    ``A`` and ``B`` are the two halves of an unscrambled ``2·dim``-dimensional QMC sequence
    (Sobol from torch, Halton from SciPy); ``C_i`` is ``A`` with column ``i`` taken from ``B``.
    Deterministic: no scrambling, so no seed.

    ``skip_first`` drops the sequence's first point (the origin, all zeros) and takes the next
    ``nb_design``. ``None`` follows the reference of each use: Xplique's Sobol attribution draws
    with ``tf.math.sobol_sample``, whose first point is the sequence's second (so ``True`` for
    ``"sobol"``), while CRAFT's concept importance draws with SciPy's Halton, which starts at the
    origin (so ``False`` for ``"halton"``).
    """
    if nb_design < 2:
        raise ValueError(f"nb_design must be at least 2 (Jansen needs a variance), got {nb_design}")
    if skip_first is None:
        skip_first = sequence == "sobol"
    skip = int(bool(skip_first))
    if sequence == "sobol":
        if nb_design & (nb_design - 1):
            raise ValueError(f"a Sobol design needs a power-of-two nb_design, got {nb_design}")
        points = torch.quasirandom.SobolEngine(2 * dim, scramble=False).draw(nb_design + skip, dtype=torch.float64)[skip:]
    elif sequence == "halton":
        from scipy.stats import qmc  # local: SciPy only for the Halton path

        points = torch.from_numpy(np.asarray(qmc.Halton(2 * dim, scramble=False).random(nb_design + skip)))[skip:]
    else:
        raise ValueError(f"unknown QMC sequence {sequence!r}; use 'sobol' or 'halton'")
    a, b = points[:, :dim], points[:, dim:]
    # C_i = A with column i from B, for every i at once: (dim, nb_design, dim).
    eye = torch.eye(dim, dtype=torch.bool)
    c = torch.where(eye[:, None, :], b[None], a[None])
    return torch.cat([a, b, c.reshape(dim * nb_design, dim)]).float()


def jansen_total_order(scores: Tensor, nb_design: int, eps: float = 1e-12) -> Tensor:
    """Total-order Sobol indices from the scores of a :func:`qmc_design` layout.

    ``scores`` has shape ``(nb_design · (d + 2), …)`` (trailing dims, e.g. one per image, are
    kept). ``ST_i = Σ_n (f(A)_n − f(C_i)_n)² / (2 · N · Var(f(A)))`` with the unbiased variance
    floored by ``eps`` so a constant model gives zeros instead of NaN. Returns ``(d, …)``.
    """
    total = scores.shape[0]
    if total % nb_design or total // nb_design < 3:
        raise ValueError(f"{total} scores do not form a design of nb_design={nb_design} and d≥1")
    dim = total // nb_design - 2
    f_a = scores[:nb_design]
    f_c = scores[2 * nb_design :].reshape(dim, nb_design, *scores.shape[1:])
    var = f_a.var(dim=0, unbiased=True).clamp_min(eps)
    return ((f_a[None] - f_c) ** 2).sum(dim=1) / (2 * nb_design * var)
