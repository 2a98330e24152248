"""Fixed probe sets for diagnostics: chosen once, balanced over classes, sharded over ranks.

Every monitor scores the same images at every epoch so its curves compare (DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset


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


def image_and_label(sample: object, index: int) -> tuple[torch.Tensor, int]:
    """``(image, label)`` of a ``Sample`` (batch contract) or of an ``(image, label)`` pair."""
    if hasattr(sample, "image") and hasattr(sample, "label"):
        return sample.image, int(sample.label)
    if isinstance(sample, (tuple, list)) and len(sample) == 2:
        return sample[0], int(sample[1])
    raise ValueError(
        f"probe sample {index} is a {type(sample).__name__}; expected Sample(image, human_map, has_map, label) "
        "or an (image, label) pair"
    )


def probe_dataset(trainer: pl.Trainer, stage: str = "val") -> Dataset:
    """The map-style dataset behind the trainer's first ``stage`` (``"val"``/``"train"``) loader.

    Falls back to the datamodule's loader when the trainer has not built one (e.g. the training
    loader during a stand-alone ``validate``).
    """
    if stage not in ("val", "train"):
        raise ValueError(f"probe stage must be 'val' or 'train', got {stage!r}")
    loaders = trainer.val_dataloaders if stage == "val" else trainer.train_dataloader
    if loaders is None and trainer.datamodule is not None:
        loaders = getattr(trainer.datamodule, f"{stage}_dataloader")()
    if isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    dataset = getattr(loaders, "dataset", None)
    if dataset is None:
        raise ValueError(f"no {stage} dataloader to take a probe set from")
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ValueError(
            f"the {stage} dataset ({type(dataset).__name__}) is not map-style (no len/indexing): a fixed probe set "
            "needs random access"
        )
    return dataset


def load_probe(
    dataset: Dataset,
    per_class: int,
    num_classes: int,
    classes: Sequence[int] | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A balanced probe set as ``(images (N,C,H,W), labels (N,))``, the same on every rank for a seed.

    Sorted by class (see :func:`balanced_indices`). Tensors are built outside inference mode
    so a monitor can take gradients through them during a stand-alone ``validate``.
    """
    with torch.inference_mode(False):
        indices = balanced_indices(
            len(dataset), lambda i: image_and_label(dataset[i], i)[1], per_class, num_classes, seed, classes
        )
        if not indices:
            raise ValueError(f"the probe found no sample of classes {list(classes) if classes else list(range(num_classes))}")
        pairs = [image_and_label(dataset[i], i) for i in indices]
        images = torch.stack([torch.as_tensor(image).clone() for image, _ in pairs])
        labels = torch.tensor([label for _, label in pairs])
    return images, labels
