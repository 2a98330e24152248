"""``ClickMeDataModule``: ClickMe records, image folders or tar shards, optionally mixed.

Each split is a *source*, recognized by what it names:
- a folder holding ``shards.json`` → WebDataset shards (:mod:`harmonia.data.shards`), streamed;
- a folder holding ``index.csv`` → an image folder (:mod:`harmonia.data.folder`);
- anything else → ClickMe TFRecords: a file, a folder of ``*.tfrecords``, a glob or a list.

Workers hand over ``uint8`` images (4× less to collate and to copy between processes);
``on_after_batch_transfer`` makes them float in [0, 1] on the device, so the module sees the
batch contract. (With ``normalize: true`` the workers normalize and hand over floats.)

Where the training augmentation runs (``augment_on``): ``"auto"`` (default) picks ``"device"``
when the trainer runs on an accelerator (GPU) and the training source allows it (ClickMe
records or ClickMe shards, no colour jitter, no mixture), else ``"worker"``; the choice is
logged. On a GPU, ``"device"`` leaves workers little beyond decoding (benchmarks/README.md);
on the CPU the same work would run in the training process instead of in parallel workers.

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

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from harmonia.data.clickme import ClickMeRecords, MapNormalization
from harmonia.data.collate import collate_samples
from harmonia.data.device_geometry import DeviceBatch, DeviceCollate, apply_device_geometry
from harmonia.data.folder import FolderDataset
from harmonia.data.mixture import MixtureDataset, MixtureSampler
from harmonia.data.shards import MANIFEST, ShardDataset, read_manifest
from harmonia.data.sample import Sample
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
        color_jitter: ``[brightness, contrast, saturation, hue]`` (image only), or None.
        normalize: normalize images with ImageNet statistics (off: models normalize themselves).
        map_normalization: ``"none"`` (reference) or ``"minmax"`` (pre-release: maps in [0, 1]).
        augment: random crop/flip/jitter in training; False trains on the evaluation transform.
        augment_on: ``"worker"``: training transforms run in the DataLoader workers;
            ``"device"``: ClickMe records/shards only, workers decode and the crop, flip and map
            blur run batched on the training device (``on_after_batch_transfer``), which
            frees the workers' CPU (benchmarks/README.md); no colour jitter, no mixtures;
            ``"auto"``: ``"device"`` on an accelerator when the source allows it, else ``"worker"``.
        train_map_decode: the training maps' 64-px map from JPEG: ``"scaled"`` (DCT-domain
            decoding at 1/4 scale, ~4× cheaper; < 1% of the peak from the reference after the
            blur) or ``"exact"``; validation and test always use ``"exact"`` (the reference).
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
        augment_on: Literal["auto", "worker", "device"] = "auto",
        train_map_decode: Literal["scaled", "exact"] = "scaled",
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
        if augment_on not in ("auto", "worker", "device"):
            raise ValueError(f"augment_on must be 'auto', 'worker' or 'device'; got {augment_on!r}")
        if train_map_decode not in ("scaled", "exact"):
            raise ValueError(f"train_map_decode must be 'scaled' or 'exact'; got {train_map_decode!r}")
        if augment_on == "device" and (unmapped_train is not None or color_jitter is not None or not augment):
            raise ValueError("augment_on='device' works with augment=True, without color_jitter and mixtures")
        self.save_hyperparameters()
        self.datasets: dict[str, Dataset] = {}
        self._reported: dict[str, int] = {}

    # -- building ---------------------------------------------------------------------------
    def transform(self, train: bool) -> JointTransform:
        """The joint transform of training (augmented) or evaluation (resize)."""
        hp = self.hparams
        return JointTransform(hp.image_size, train=train and hp.augment, scale=hp.crop_scale, hflip=hp.hflip,
                              color_jitter=hp.color_jitter, normalize=hp.normalize, uint8_output=True)

    def resolved_augment_on(self) -> Literal["worker", "device"]:
        """Where the training augmentation runs: ``augment_on``, with ``"auto"`` resolved."""
        hp = self.hparams
        if hp.augment_on != "auto":
            return hp.augment_on
        trainer = self.trainer
        on_accelerator = trainer is not None and trainer.strategy.root_device.type != "cpu"
        possible = (hp.train is not None and hp.augment and hp.color_jitter is None and hp.unmapped_train is None
                    and (source_kind(hp.train) == "records" or (source_kind(hp.train) == "shards" and
                         read_manifest(hp.train).get("map_preprocessing") == "clickme")))
        return "device" if on_accelerator and possible else "worker"

    def _open(self, source: Source, train: bool) -> Dataset:
        hp = self.hparams
        kind = source_kind(source)
        transform = self.transform(train)
        augment_on = self.resolved_augment_on() if train else "worker"
        map_decode = hp.train_map_decode if train else "exact"
        if train:
            rank_zero_info(f"ClickMeDataModule: training augmentation on the {augment_on} "
                           f"(augment_on={hp.augment_on!r}), training maps decoded {map_decode!r}")
        if kind == "folder" and augment_on == "device":
            raise ValueError(f"{source}: augment_on='device' needs ClickMe records or ClickMe shards, not a folder")
        if kind == "shards":
            return ShardDataset(source, hp.num_classes, hp.image_size, transform, hp.map_normalization,
                                shuffle=train, shuffle_buffer=hp.shuffle_buffer, seed=hp.seed,
                                skip_bad_samples=hp.skip_bad_samples, num_workers=hp.num_workers,
                                rank=self._rank()[0], world_size=self._rank()[1], augment_on=augment_on,
                                map_decode=map_decode)
        if kind == "folder":
            return FolderDataset(source, num_classes=hp.num_classes, size=hp.image_size, transform=transform,
                                 skip_bad_samples=hp.skip_bad_samples)
        return ClickMeRecords(source, hp.num_classes, hp.image_size, transform, hp.map_normalization,
                              hp.skip_bad_samples, hp.index_dir, augment_on=augment_on, map_decode=map_decode)

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str | None = None) -> None:
        """Open the sources (TFRecord files are indexed once; the index is cached)."""
        hp = self.hparams
        sources = {"train": hp.train, "val": hp.val, "test": hp.test if hp.test is not None else hp.val}
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage or "", tuple(sources)):
            if sources[split] is not None and split not in self.datasets:
                self.datasets[split] = self._open(sources[split], train=split == "train")
        if "train" in self.datasets and hp.unmapped_train is not None and "unmapped" not in self.datasets:
            self.datasets["unmapped"] = self._open(hp.unmapped_train, train=True)
            if any(isinstance(self.datasets[k], IterableDataset) for k in ("train", "unmapped")):
                raise ValueError("mixtures need random access: give train and unmapped_train as TFRecords or "
                                 "image folders, not shards")

    # -- loaders ----------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        hp = self.hparams
        workers = hp.num_workers
        common = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": torch.cuda.is_available() if hp.pin_memory is None else hp.pin_memory}
        if isinstance(dataset, IterableDataset):
            kwargs = {"batch_size": hp.batch_size}
        if getattr(dataset, "augment_on", "worker") == "device":  # boxes and flips drawn per batch
            kwargs["collate_fn"] = DeviceCollate(dataset.transform.crop, dataset.transform.hflip)
        return EpochLoader(dataset, collate_fn=kwargs.pop("collate_fn", collate_samples),
                           on_epoch=lambda: self._start_epoch(dataset), **common, **kwargs)

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
        """On the training device: uint8 images → float in [0, 1] (the batch contract), and
        with ``augment_on="device"`` the crop, flip and map blur."""
        if isinstance(batch, DeviceBatch):
            hp = self.hparams
            return apply_device_geometry(batch, hp.image_size, self.transform(True).normalization,
                                         hp.map_normalization)
        if isinstance(batch, Sample) and batch.image.dtype == torch.uint8:
            return batch._replace(image=to_float_image(batch.image))
        return batch

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
