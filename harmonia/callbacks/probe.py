"""Fixed probe sets for monitors: chosen once, balanced over classes, sharded over ranks.

Every monitor scores the same images at every run, so its curves compare. A probe is chosen
from a map-style dataset (a seeded, class-balanced draw: :func:`balanced_indices`) or from a
stream without random access (the first images of each class that rank zero reads, sent to
the other ranks), then split over DDP ranks with :func:`rank_shard`: rank ``r`` of ``w`` holds
probe rows ``r, r + w, r + 2w, …``. Probe tensors live on the CPU and are made outside
inference mode, so monitors may take gradients through them in a stand-alone ``validate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from harmonia.data.sample import Sample, collate_samples


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


def as_sample(item: Any, where: str) -> Sample:
    """A ``Sample`` from a ``Sample``, a 4-tuple, or an ``(image, label)`` pair (no human map: ``None`` fields)."""
    if isinstance(item, Sample):
        return item
    if isinstance(item, (tuple, list)) and len(item) == 4:
        return Sample(*item)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return Sample(item[0], None, None, item[1])
    if hasattr(item, "image") and hasattr(item, "label"):
        return Sample(item.image, getattr(item, "human_map", None), getattr(item, "has_map", None), item.label)
    raise TypeError(
        f"{where} is a {type(item).__name__}; a probe needs Sample(image, human_map, has_map, label) or an (image, label) pair"
    )


@dataclass
class Probe:
    """A probe set, or this rank's share of one, on the CPU.

    ``positions`` are the rows' places in the whole probe (sorted by class); ``size`` is the
    whole probe's length over every rank. ``human_maps``/``has_map`` are ``None`` when the data
    yields ``(image, label)`` pairs. ``head`` holds the first rows of the whole probe (the rows a
    monitor draws in its pictures) on every rank; it is ``None`` when no rows were asked for.
    """

    images: Tensor
    labels: Tensor
    human_maps: Tensor | None
    has_map: Tensor | None
    positions: Tensor
    size: int
    head: Probe | None = None

    def __len__(self) -> int:
        return len(self.labels)


def _stack(samples: Sequence[Sample], positions: Sequence[int], size: int, like: Sample | None = None) -> Probe:
    """A :class:`Probe` from samples, as normal (not inference) CPU tensors.

    An empty share (more ranks than probe rows) keeps the shapes of ``like``, so a rank with no
    rows still runs the same collective code as the others.
    """
    with torch.inference_mode(False):
        rows = list(samples) or ([like] if like is not None else [])
        column = lambda k: [torch.as_tensor(s[k]).detach().cpu().clone() for s in rows]  # noqa: E731
        keep = slice(None) if samples else slice(0, 0)
        images = torch.stack(column(0))[keep] if rows else torch.zeros(0)
        labels = torch.tensor([int(s.label) for s in samples], dtype=torch.long)
        has_maps = bool(rows) and all(s.human_map is not None and s.has_map is not None for s in rows)
        human = torch.stack(column(1))[keep] if has_maps else None
        has_map = torch.stack(column(2)).bool().reshape(-1)[keep] if has_maps else None
        return Probe(images, labels, human, has_map, torch.as_tensor(list(positions), dtype=torch.long), size)


def probe_loader(trainer: pl.Trainer, stage: str) -> DataLoader | None:
    """The trainer's first ``stage`` (``"val"``/``"train"``) DataLoader, else the datamodule's; ``None`` if neither exists yet.

    Before a fit's loops start (``on_fit_start``) the trainer has built no loader: only a
    datamodule can answer then.
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
    return loaders


def is_stream(dataset: object) -> bool:
    """Whether ``dataset`` has no random access (an ``IterableDataset`` or no ``len``/indexing)."""
    return isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"))


def _row(column: Any, i: int) -> Any:
    """Row ``i`` of a batch column, as a tensor of its own when the column is a tensor."""
    return column[i].clone() if isinstance(column, torch.Tensor) else column[i]


def first_of_each_class(batches: Iterable[Any], per_class: int, classes: Sequence[int], max_batches: int = 200) -> list[Sample]:
    """The first ``per_class`` samples of each class in a stream of batches, sorted by class.

    Stops once every class is full or after ``max_batches`` batches (a class the stream never
    shows then contributes nothing).
    """
    picked: dict[int, list[Sample]] = {int(c): [] for c in classes}
    for b, batch in enumerate(batches):
        batch = as_sample(batch, "a batch of the probe's stream")
        for i, label in enumerate(torch.as_tensor(batch.label).reshape(-1).tolist()):
            bucket = picked.get(int(label))
            if bucket is not None and len(bucket) < per_class:
                # A copy of the row: a view would keep its whole batch alive (up to ``max_batches``
                # of them) and be pickled with it when rank zero sends its choice.
                bucket.append(Sample(*(None if t is None else _row(t, i) for t in batch)))
        if b + 1 >= max_batches or all(len(v) >= per_class for v in picked.values()):
            break
    return [s for c in classes for s in picked[int(c)]]


def choose_probe(
    source: Dataset | DataLoader,
    classes: Sequence[int],
    per_class: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shard: bool = True,
    head_rows: int = 0,
    broadcast: Callable[[Any], Any] | None = None,
    finish: Callable[[Any], Any] | None = None,
) -> Probe:
    """This rank's share of the class-balanced probe of ``source``, with its first ``head_rows`` rows.

    ``source`` is a map-style dataset (or a DataLoader over one): a seeded draw of ``per_class``
    samples of each class (:func:`balanced_indices`), the same on every rank, of which each rank
    reads only its share and the head. A DataLoader over a stream is read by rank zero only
    (:func:`first_of_each_class`), and ``broadcast`` (``trainer.strategy.broadcast``) hands its
    choice to the other ranks, so every rank agrees on one probe even if each streams other data.
    With ``shard=False`` every rank holds the whole probe.

    ``finish`` turns a collated batch of the loader's items into a ``Sample`` batch (a
    DataModule's ``finish_batch``: ClickMe records arrive as uint8 images with 64-px maps and
    become training-ready only there), so the probe holds what the model sees in evaluation.
    """
    dataset = source.dataset if isinstance(source, DataLoader) else source

    def finished(items: list[Any]) -> list[Sample]:
        if finish is None or not items:
            return [as_sample(item, f"a probe sample of {type(dataset).__name__}") for item in items]
        batch = as_sample(finish(collate_samples(items)), f"a finished probe batch of {type(dataset).__name__}")
        return [Sample(*(None if t is None else t[i] for t in batch)) for i in range(len(items))]

    if not is_stream(dataset):
        def label_of(i: int) -> int:
            return int(as_sample(dataset[i], f"sample {i} of {type(dataset).__name__}").label)

        chosen = balanced_indices(len(dataset), label_of, per_class, max(classes) + 1, seed, classes)
        size = len(chosen)
        mine = rank_shard(range(size), rank, world_size) if shard else list(range(size))
        head = list(range(min(head_rows, size)))
        wanted = sorted(set(mine) | set(head) | ({0} if size else set()))
        rows = dict(zip(wanted, finished([dataset[chosen[j]] for j in wanted])))
        like = rows[0] if size else None
        probe = _stack([rows[j] for j in mine], mine, size, like)
        probe.head = _stack([rows[j] for j in head], head, size, like) if head_rows else None
        return probe

    if not isinstance(source, DataLoader):
        raise TypeError(f"a stream ({type(dataset).__name__}) is read through its DataLoader; got the dataset alone")
    batches = source if finish is None else (finish(batch) for batch in source)
    samples = first_of_each_class(batches, per_class, classes) if rank == 0 else None
    if world_size > 1:
        if broadcast is None:
            raise ValueError("a probe from a stream under several ranks needs `broadcast` (trainer.strategy.broadcast)")
        samples = broadcast(samples)
    size = len(samples)
    mine = rank_shard(range(size), rank, world_size) if shard else list(range(size))
    like = samples[0] if samples else None
    probe = _stack([samples[j] for j in mine], mine, size, like)
    head = list(range(min(head_rows, size)))
    probe.head = _stack([samples[j] for j in head], head, size, like) if head_rows else None
    return probe
