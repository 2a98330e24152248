"""Training terms (plain PyTorch): classification objectives and penalties on input gradients.

    objective = TauCrossEntropy(tau=10.0)
    penalties = [Harmonization(weight=0.1, saliency=Saliency(reduction="mean_abs", score="log_prob"),
                               schedule=Cosine(end_scale=0.1)),
                 RightReasons(weight=0.3)]
"""

from harmonia.losses.harmonization import (
    Harmonization,
    gaussian_pyramid,
    harmonization_error,
    pyramidal_mse,
    standardize_cut,
)
from harmonia.losses.objectives import HKR, CrossEntropy, TauCrossEntropy
from harmonia.losses.penalty import Constant, Cosine, Penalty, Schedule
from harmonia.losses.rrr import RightReasons, irrelevance_mask

__all__ = [
    "Constant",
    "Cosine",
    "CrossEntropy",
    "HKR",
    "Harmonization",
    "Penalty",
    "RightReasons",
    "Schedule",
    "TauCrossEntropy",
    "gaussian_pyramid",
    "harmonization_error",
    "irrelevance_mask",
    "pyramidal_mse",
    "standardize_cut",
]
