"""Lightning callbacks that read the model from the outside: probes, diagnostics, logging."""

from harmonia.callbacks.concepts import ConceptMonitor
from harmonia.callbacks.feature_viz import FeatureVizMonitor
from harmonia.callbacks.finetuning import FinetuningSchedule
from harmonia.callbacks.lipschitz import LipschitzMonitor
from harmonia.callbacks.logging import log_image
from harmonia.callbacks.monitor import ProbeMonitor
from harmonia.callbacks.probe import Probe, balanced_indices, rank_shard
from harmonia.callbacks.saliency import SaliencyMonitor

__all__ = [
    "ConceptMonitor",
    "FeatureVizMonitor",
    "FinetuningSchedule",
    "LipschitzMonitor",
    "Probe",
    "ProbeMonitor",
    "SaliencyMonitor",
    "balanced_indices",
    "log_image",
    "rank_shard",
]
