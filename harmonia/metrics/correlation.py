"""Row-wise Spearman rank correlation, the statistic behind alignment and MuFidelity."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor


def spearman_rows(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation of each row of ``a`` with the same row of ``b``, shape ``(N,)``.

    Ties get their average rank (``scipy.stats.rankdata``, as ``scipy.stats.spearmanr``), then
    Pearson's correlation of the ranks in float64. A row that is constant in ``a`` or ``b`` has
    no ranking: its correlation is undefined and reported as 0 (Xplique's MuFidelity does the
    same with SciPy's NaN), so one dead map cannot turn a whole batch mean into NaN.
    Ranks are taken on the CPU (maps are small next to the forwards that made them).
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two (N, D) tensors of the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("Spearman correlation of maps with NaN or infinite values")
    if a.shape[1] < 2:
        return torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    ra = rankdata(a.detach().cpu().double().numpy(), axis=1)
    rb = rankdata(b.detach().cpu().double().numpy(), axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    rho = np.divide((ra * rb).sum(axis=1), denom, out=np.zeros(len(ra)), where=denom > 0)
    return torch.from_numpy(np.clip(rho, -1.0, 1.0)).to(a.device)
