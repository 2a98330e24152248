"""Lightning callbacks that read the model from the outside: probes, diagnostics, logging."""

from harmonia.callbacks.finetuning import FinetuningSchedule
from harmonia.callbacks.logging import log_image
from harmonia.callbacks.probe import balanced_indices, rank_shard

__all__ = ["FinetuningSchedule", "balanced_indices", "log_image", "rank_shard"]
