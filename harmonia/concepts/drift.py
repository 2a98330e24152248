"""Concept drift: how much a concept bank changed between two extractions.

NMF returns concepts in no particular order, so two banks are compared after a one-to-one
matching: the cosine similarity of every pair of concept vectors, then the assignment that
maximizes the total similarity (Hungarian algorithm, SciPy's ``linear_sum_assignment``).
Drift score = mean similarity of the matched pairs: 1.0 for the same concepts in any order,
lower as concepts move.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor


@dataclass
class ConceptMatching:
    """``new[order[j]]`` is matched to ``old[j]`` with cosine ``similarity[j]``; ``score`` is their mean."""

    order: Tensor
    similarity: Tensor
    score: float


def match_concepts(old: Tensor, new: Tensor) -> ConceptMatching:
    """Match the concepts (rows) of ``new`` to those of ``old`` one-to-one by cosine similarity.

    Both banks are ``(k, channels)``; they need the same ``k`` and width. A zero concept vector
    has similarity 0 with everything.
    """
    if old.ndim != 2 or old.shape != new.shape:
        raise ValueError(f"concept banks must have the same (k, channels) shape; got {tuple(old.shape)} and {tuple(new.shape)}")
    sim = F.normalize(old.double(), dim=1) @ F.normalize(new.double(), dim=1).T  # (k_old, k_new)
    rows, cols = linear_sum_assignment(sim.cpu().numpy(), maximize=True)
    order = torch.as_tensor(cols, dtype=torch.long)[torch.as_tensor(rows).argsort()]
    matched = sim.cpu()[torch.arange(len(order)), order]
    return ConceptMatching(order, matched.float(), float(matched.mean()))
