"""The explanation atlas: what a checkpoint sees, class by class, as an offline static site."""

from harmonia.atlas.schema import SCHEMA_VERSION, validate

__all__ = ["SCHEMA_VERSION", "validate"]
