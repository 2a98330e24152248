"""Datasets yielding ``Sample(image, human_map, has_map, label)`` and their DataModules."""

from harmonia.data.datamodule import DecoyDigitsDataModule
from harmonia.data.digits import DecoyDigits
from harmonia.data.sample import Sample

__all__ = ["DecoyDigits", "DecoyDigitsDataModule", "Sample"]
