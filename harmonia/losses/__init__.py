"""Objectives and the harmonization loss (plain PyTorch)."""

from harmonia.losses.harmonization import (
    HarmonizationLoss,
    gaussian_pyramid,
    pyramidal_mse,
    standardize_cut,
)
from harmonia.losses.objectives import OBJECTIVES, build_objective, decayed_parameters

__all__ = [
    "HarmonizationLoss",
    "OBJECTIVES",
    "build_objective",
    "decayed_parameters",
    "gaussian_pyramid",
    "pyramidal_mse",
    "standardize_cut",
]
