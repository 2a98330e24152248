"""Datasets yielding ``Sample(image, human_map, has_map, label)`` and their DataModules."""

from harmonia.data.clickme import ClickMeRecords
from harmonia.data.datamodule import DecoyDigitsDataModule
from harmonia.data.datamodule_clickme import ClickMeDataModule
from harmonia.data.digits import DecoyDigits
from harmonia.data.errors import BadSampleError
from harmonia.data.folder import FolderDataset
from harmonia.data.sample import Sample
from harmonia.data.shards import ShardDataset
from harmonia.data.transforms import JointTransform

__all__ = [
    "BadSampleError",
    "ClickMeDataModule",
    "ClickMeRecords",
    "DecoyDigits",
    "DecoyDigitsDataModule",
    "FolderDataset",
    "JointTransform",
    "Sample",
    "ShardDataset",
]
