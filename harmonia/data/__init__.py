"""Datasets of ``Sample(image, human_map, has_map, label)`` and their DataModules.

A batch's path: a dataset reads and decodes one sample at a time in the DataLoader workers
(ClickMe records: :class:`ClickMeSample`, a ``uint8`` image and a 64-px map; image folders and
plain shards: a ``Sample`` cropped per sample); the DataLoader batches them with its own collate;
the DataModule's ``on_after_batch_transfer`` turns the batch into the ``Sample`` the module
trains on, on the training device.
"""

from harmonia.data.clickme import ClickMeRecords, ClickMeSample, finish_clickme_batch
from harmonia.data.datamodule import DecoyDigitsDataModule
from harmonia.data.datamodule_clickme import ClickMeDataModule
from harmonia.data.digits import DecoyDigits
from harmonia.data.errors import BadSampleError
from harmonia.data.folder import FolderDataset
from harmonia.data.mixture import MixedBatch, MixtureDataset, MixtureSampler
from harmonia.data.sample import Sample, collate_samples
from harmonia.data.shards import ShardDataset
from harmonia.data.tfrecord import RecordIndex
from harmonia.data.transforms import JointTransform

__all__ = [
    "BadSampleError",
    "ClickMeDataModule",
    "ClickMeRecords",
    "ClickMeSample",
    "DecoyDigits",
    "DecoyDigitsDataModule",
    "FolderDataset",
    "JointTransform",
    "MixedBatch",
    "MixtureDataset",
    "MixtureSampler",
    "RecordIndex",
    "Sample",
    "ShardDataset",
    "collate_samples",
    "finish_clickme_batch",
]
