"""The batch contract shared by every dataset: ``(image, human_map, has_map, label)``."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Sample(NamedTuple):
    """One sample, or a batch of them after ``default_collate`` (which keeps the NamedTuple).

    - ``image``: ``(C,H,W)`` float in [0, 1], before any model normalization;
    - ``human_map``: ``(1,H,W)`` float >= 0 (zeros when ``has_map`` is False);
    - ``has_map``: bool, whether ``human_map`` is a real human map;
    - ``label``: int64 class index.
    """

    image: Tensor
    human_map: Tensor
    has_map: Tensor
    label: Tensor
