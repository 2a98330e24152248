"""``ClickMeDataModule``: ClickMe records, image folders or tar shards, optionally mixed.

Each split is a *source*, recognized by what it names:
- a folder holding ``shards.json`` → WebDataset shards (:mod:`harmonia.data.shards`), streamed;
- a folder holding ``index.csv`` → an image folder (:mod:`harmonia.data.folder`);
- anything else → ClickMe TFRecords: a file, a folder of ``*.tfrecords``, a glob or a list.

Where the work happens: DataLoader workers read, check and decode each sample (one sample at a
time, batched by the DataLoader's own collate and shared memory). ClickMe records and ClickMe
shards arrive as :class:`~harmonia.data.clickme.ClickMeSample` batches (``uint8`` images at
their own size, 64-px maps); ``on_after_batch_transfer`` then blurs the maps, crops and flips
image and map together (training) or resizes them (evaluation), batched, on the training
device, on a GPU and on the CPU alike. Image folders and plain shards hold images of many
sizes, so their samples are cropped in the workers (:class:`JointTransform`) and arrive as
``Sample`` batches with ``uint8`` images. Either way the module receives the batch contract,
``Sample`` with float images in [0, 1] (normalized only with ``normalize: true``).

``unmapped_train`` adds a second, map-less training source (e.g. ImageNet as a folder) mixed
in at ``1 - mapped_fraction`` of every batch (:mod:`harmonia.data.mixture`; the lab's
pre-release runs used 20% ClickMe / 80% ImageNet). Mixtures need random access, so both
sources must be records or folders (not shards).

Bad samples raise a :class:`~harmonia.data.errors.BadSampleError` naming the file and
record / CSV line; with ``skip_bad_samples=True`` they are left out of their batch, counted,
and reported (``rank_zero_warn``) at the start of each epoch and at teardown; ``skipped``
holds the running total of this process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from harmonia.data.clickme import ClickMeRecords, ClickMeSample, MapNormalization, finish_clickme_batch
from harmonia.data.folder import FolderDataset
from harmonia.data.heatmap import minmax
from harmonia.data.mixture import MixedBatch, MixtureDataset, MixtureSampler
from harmonia.data.sample import Sample, collate_samples
from harmonia.data.shards import MANIFEST, ShardDataset
from harmonia.data.transforms import JointTransform, to_float_image

Source = str | list[str]


def source_kind(source: Source) -> Literal["shards", "folder", "records"]:
    """What a source names: a shard folder, an image folder, or ClickMe records."""
    if isinstance(source, str) and Path(source).is_dir():
        if (Path(source) / MANIFEST).is_file():
            return "shards"
        if (Path(source) / "index.csv").is_file():
            return "folder"
    return "records"


class EpochLoader(DataLoader):
    """A DataLoader that calls ``on_epoch()`` each time an epoch's iteration starts.

    Streamed shards need the epoch number to pick their shard order, and Lightning only tells
    samplers (which an ``IterableDataset`` cannot have) about epochs.
    """

    def __init__(self, *args: Any, on_epoch: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_epoch = on_epoch

    def __iter__(self):  # noqa: D105
        if self.on_epoch is not None:
            self.on_epoch()
        return super().__iter__()


class ClickMeDataModule(pl.LightningDataModule):
    """Human-map datasets at scale: ClickMe TFRecords, image folders, tar shards, mixtures.

    Args:
        train: training source (see the module docstring), or None (evaluation only).
        val: validation source, or None.
        test: test source; None uses ``val``.
        unmapped_train: optional map-less training source mixed into every batch.
        mapped_fraction: share of each training batch taken from ``train`` when mixing.
        epoch_by: with a mixture, the source that defines an epoch (``"unmapped"``: each of its
            samples once; the other is cycled) or a number of batches per process.
        num_classes: labels must lie in ``[0, num_classes)`` (ImageNet/ClickMe: 1000).
        image_size: side of the square images and maps in batches (reference: 224).
        crop_scale: area range of the training random resized crop.
        hflip: probability of a horizontal flip in training.
        color_jitter: ``[brightness, contrast, saturation, hue]`` (image only, training only), or None.
        normalize: normalize images with ImageNet statistics, on the training device (off:
            models normalize themselves).
        map_normalization: ``"none"`` (reference) or ``"minmax"`` (pre-release: each map scaled
            to [0, 1]), applied to the maps of every source on the training device.
        augment: random crop/flip/jitter in training; False trains on the evaluation transform.
        batch_size: per-process batch size.
        num_workers: DataLoader workers per process.
        seed: order of mixtures and shards (the same on every rank).
        shuffle_buffer: in-worker shuffle buffer of streamed shards.
        skip_bad_samples: leave bad samples out (counted and reported) instead of failing.
        index_dir: where TFRecord offset indexes are cached (None: beside each file).
        pin_memory: pin batches for faster host-to-GPU copies (None: when CUDA is available).
    """

    def __init__(
        self,
        train: Source | None = None,
        val: Source | None = None,
        test: Source | None = None,
        unmapped_train: Source | None = None,
        mapped_fraction: float = 0.2,
        epoch_by: Literal["unmapped", "mapped"] | int = "unmapped",
        num_classes: int = 1000,
        image_size: int = 224,
        crop_scale: Sequence[float] = (0.08, 1.0),
        hflip: float = 0.5,
        color_jitter: Sequence[float] | None = None,
        normalize: bool = False,
        map_normalization: MapNormalization = "none",
        augment: bool = True,
        batch_size: int = 64,
        num_workers: int = 4,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        skip_bad_samples: bool = False,
        index_dir: str | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if train is None and val is None and test is None:
            raise ValueError("ClickMeDataModule needs at least one of train, val, test")
        if unmapped_train is not None and train is None:
            raise ValueError("unmapped_train is mixed into train: give train too")
        if map_normalization not in ("none", "minmax"):
            raise ValueError(f"map_normalization must be 'none' or 'minmax'; got {map_normalization!r}")
        self.save_hyperparameters()
        self.datasets: dict[str, Dataset] = {}
        self._reported: dict[str, int] = {}
        self._transforms: dict[bool, JointTransform] = {}
        self._generator: torch.Generator | None = None

    # -- building ---------------------------------------------------------------------------
    def transform(self, train: bool) -> JointTransform:
        """The joint transform of training (augmented) or evaluation (resize), with this module's
        options; ClickMe batches get it whole on the device (``apply_batch``)."""
        if train not in self._transforms:  # built once: it is asked for on every batch
            hp = self.hparams
            self._transforms[train] = JointTransform(hp.image_size, train=train and hp.augment, scale=hp.crop_scale,
                                                     hflip=hp.hflip, color_jitter=hp.color_jitter, normalize=hp.normalize)
        return self._transforms[train]

    def _worker_transform(self, train: bool) -> JointTransform:
        """The per-sample transform of sources cropped in the workers: ``uint8`` images out,
        normalization left to the device (as for every source)."""
        hp = self.hparams
        return JointTransform(hp.image_size, train=train and hp.augment, scale=hp.crop_scale, hflip=hp.hflip,
                              color_jitter=hp.color_jitter, uint8_output=True)

    def _open(self, source: Source, train: bool) -> Dataset:
        hp = self.hparams
        kind = source_kind(source)
        if kind == "shards":
            return ShardDataset(source, hp.num_classes, hp.image_size, self._worker_transform(train),
                                shuffle=train, shuffle_buffer=hp.shuffle_buffer, seed=hp.seed,
                                skip_bad_samples=hp.skip_bad_samples, num_workers=hp.num_workers,
                                rank=self._rank()[0], world_size=self._rank()[1])
        if kind == "folder":
            return FolderDataset(source, num_classes=hp.num_classes, size=hp.image_size,
                                 transform=self._worker_transform(train), skip_bad_samples=hp.skip_bad_samples)
        return ClickMeRecords(source, hp.num_classes, hp.skip_bad_samples, hp.index_dir)

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str | None = None) -> None:
        """Open the sources (TFRecord files are indexed once; the index is cached).

        A split with no samples is a ``ValueError`` naming the split and its source: trained
        on nothing, a fit would run zero steps and report an untrained model as its result.
        """
        hp = self.hparams
        sources = {"train": hp.train, "val": hp.val, "test": hp.test if hp.test is not None else hp.val}
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage or "", tuple(sources)):
            if sources[split] is not None and split not in self.datasets:
                dataset = self._open(sources[split], train=split == "train")
                self._check_not_empty(split if split != "test" or hp.test is not None else "test (= val)",
                                      sources[split], dataset)
                self.datasets[split] = dataset
        if "train" in self.datasets and hp.unmapped_train is not None and "unmapped" not in self.datasets:
            unmapped = self._open(hp.unmapped_train, train=True)
            self._check_not_empty("unmapped_train", hp.unmapped_train, unmapped)
            self.datasets["unmapped"] = unmapped
            if any(isinstance(self.datasets[k], IterableDataset) for k in ("train", "unmapped")):
                raise ValueError("mixtures need random access: give train and unmapped_train as TFRecords or "
                                 "image folders, not shards")

    def _check_not_empty(self, split: str, source: Source, dataset: Dataset) -> None:
        """Refuse a split that yields no samples, naming the split and its source."""
        if len(dataset) > 0:
            return
        where = source if isinstance(source, str) else ", ".join(map(str, source))
        if isinstance(dataset, ShardDataset) and sum(dataset.counts) > 0:
            rank, world = self._rank()
            workers = max(self.hparams.num_workers, 1)
            raise ValueError(
                f"ClickMeDataModule: the {split} split ({where}) yields no samples on rank {rank}: its "
                f"{sum(dataset.counts)} samples in {len(dataset.counts)} shard(s) cannot be shared by {world} "
                f"rank(s) x {workers} worker(s); write smaller shards (harmonia convert --max-count) or use "
                "fewer workers"
            )
        raise ValueError(f"ClickMeDataModule: the {split} split ({where}) has no samples; "
                         "give a source with data, or leave the split out")

    # -- loaders ----------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        hp = self.hparams
        workers = hp.num_workers
        pin = torch.cuda.is_available() if hp.pin_memory is None else hp.pin_memory
        if isinstance(dataset, IterableDataset):
            kwargs = {"batch_size": hp.batch_size}
        kwargs.setdefault("collate_fn", collate_samples)
        return EpochLoader(dataset, num_workers=workers, persistent_workers=workers > 0, pin_memory=pin,
                           on_epoch=lambda: self._start_epoch(dataset), **kwargs)

    def _start_epoch(self, dataset: Dataset) -> None:
        """Report last epoch's skips; tell streamed shards the epoch (their shard order)."""
        self.report_skipped()
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)

    def train_dataloader(self) -> DataLoader:
        """Training batches: shuffled records/folder, streamed shards, or a mixture."""
        hp = self.hparams
        train = self.datasets["train"]
        if "unmapped" in self.datasets:
            mixture = MixtureDataset(train, self.datasets["unmapped"])
            rank, world = self._rank()
            sampler = MixtureSampler(mixture, hp.batch_size, hp.mapped_fraction, hp.seed, rank, world, hp.epoch_by)
            return self._loader(mixture, sampler=sampler, batch_size=None, collate_fn=_identity)
        if isinstance(train, IterableDataset):
            return self._loader(train)
        if len(train) < hp.batch_size:  # drop_last would silently train on nothing
            raise ValueError(f"the training set has {len(train)} samples, fewer than batch_size {hp.batch_size}")
        return self._loader(train, batch_size=hp.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (evaluation transform, fixed order)."""
        return self._loader(self.datasets["val"], batch_size=self.hparams.batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches (``test``, else ``val``)."""
        return self._loader(self.datasets["test"], batch_size=self.hparams.batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split, for ``harmonia predict``."""
        return self.test_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the training device: the loader's batch → ``Sample`` (:meth:`finish_batch`), with
        the training augmentation while the trainer trains."""
        trainer = self.trainer  # None when called outside a Trainer
        return self.finish_batch(batch, train=trainer is not None and trainer.training)

    def finish_batch(self, batch: Any, train: bool = False) -> Sample:
        """A batch as the loaders yield it (where it lies: the training device) → ``Sample``.

        ``ClickMeSample`` batches get the map blur and the training crop and flip (``train``)
        or the evaluation resize; ``Sample`` batches (cropped in the workers) get their images
        made float in [0, 1]; both get the optional normalization and map normalization; a
        mixture's two parts are finished alike and concatenated, mapped first. Also for code
        that reads a dataset of this module directly (e.g. a probe set:
        ``finish_batch(collate_samples([dataset[i] for i in indices]))``).
        """
        hp = self.hparams
        if isinstance(batch, MixedBatch):
            parts = [self.finish_batch(part, train) for part in batch if part is not None]
            return Sample(*(torch.cat(fields) for fields in zip(*parts))) if len(parts) > 1 else parts[0]
        if isinstance(batch, ClickMeSample):
            generator = self._augmentation_rng() if train else None
            return finish_clickme_batch(batch, self.transform(train), hp.map_normalization, generator)
        if isinstance(batch, Sample):
            image = to_float_image(batch.image)
            if hp.normalize and batch.image.dtype == torch.uint8:  # worker-side transforms leave it to us
                image = self.transform(False).normalization(image)
            human_map = minmax(batch.human_map) if hp.map_normalization == "minmax" else batch.human_map
            return Sample(image, human_map, batch.has_map, batch.label)
        raise TypeError(f"ClickMeDataModule cannot finish a batch of type {type(batch).__name__}")

    def _augmentation_rng(self) -> torch.Generator:
        """The generator of the batched crops and flips: seeded from torch's seed (``seed_everything``)
        and this process's rank, so that DDP ranks do not crop their batches alike."""
        if self._generator is None:
            seed = np.random.SeedSequence([torch.initial_seed(), self._rank()[0]]).generate_state(1, np.uint64)[0]
            self._generator = torch.Generator().manual_seed(int(seed) & (2**63 - 1))
        return self._generator

    # -- bad-sample reporting -----------------------------------------------------------------
    @property
    def skipped(self) -> int:
        """Bad samples skipped so far by this process (all splits, all workers)."""
        return sum(getattr(d, "skips").skipped for d in self.datasets.values() if hasattr(d, "skips"))

    def report_skipped(self) -> None:
        """Warn (rank zero) about bad samples skipped since the last report."""
        for name, dataset in self.datasets.items():
            skips = getattr(dataset, "skips", None)
            if skips is None:
                continue
            total = skips.skipped
            if total > self._reported.get(name, 0):
                rank_zero_warn(f"ClickMeDataModule[{name}]: skipped {total - self._reported.get(name, 0)} bad "
                               f"sample(s) ({total} in all, {skips.read} read); the first reasons are in the "
                               "'harmonia.data' log")
                self._reported[name] = total

    def teardown(self, stage: str | None = None) -> None:
        """Report the skips of the last epoch."""
        self.report_skipped()


def _identity(batch: Any) -> Any:
    """The mixture dataset already returns collated batches."""
    return batch
