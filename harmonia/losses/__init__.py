"""Objectives and the harmonization loss (plain PyTorch)."""

from harmonia.losses.harmonization import (
    HarmonizationLoss,
    gaussian_pyramid,
    pyramidal_mse,
    standardize_cut,
)
from harmonia.losses.objectives import OBJECTIVES, build_objective, decayed_parameters
from harmonia.losses.rrr import RightReasonsLoss

__all__ = [
    "HarmonizationLoss",
    "OBJECTIVES",
    "RightReasonsLoss",
    "build_objective",
    "decayed_parameters",
    "gaussian_pyramid",
    "pyramidal_mse",
    "standardize_cut",
]
