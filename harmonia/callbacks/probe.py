"""Fixed probe sets for diagnostics: chosen once, balanced over classes, sharded over ranks.

Every monitor scores the same images at every epoch so its curves compare (DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def balanced_indices(
    num_samples: int,
    label_of: Callable[[int], int],
    per_class: int,
    num_classes: int,
    seed: int = 0,
    classes: Sequence[int] | None = None,
) -> list[int]:
    """Indices of up to ``per_class`` samples of each class, the same for a given ``seed``.

    Walks a seeded permutation of the dataset and reads labels one sample at a time, stopping as
    soon as every wanted class is full, so a large dataset is not read in full. Classes with
    fewer samples contribute what they have. Returned sorted by class, then by draw order.
    """
    wanted = list(range(num_classes)) if classes is None else list(classes)
    picked: dict[int, list[int]] = {c: [] for c in wanted}
    missing = len(wanted)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
    for index in order:
        label = int(label_of(index))
        bucket = picked.get(label)
        if bucket is None or len(bucket) >= per_class:
            continue
        bucket.append(index)
        if len(bucket) == per_class:
            missing -= 1
            if missing == 0:
                break
    return [i for c in wanted for i in picked[c]]


def rank_shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's strided share of ``indices``; shares are disjoint and cover every index once.

    Shares may differ in length by one: metrics reduce sums through torchmetrics, so nothing is
    padded or counted twice.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    return list(indices[rank::world_size])
