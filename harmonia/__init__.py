"""Harmonia: train aligned, interpretable image classifiers with PyTorch Lightning."""

__version__ = "0.1.0"
