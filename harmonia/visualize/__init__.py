"""Feature visualization (plain PyTorch): MACO pictures of classes, directions and CRAFT concepts.

    spectrum = Spectrum.from_images(train_images)          # local data, no download
    image, alpha = maco(model, ClassLogit(3), spectrum, **SMALL_INPUT_SETTINGS)
    save_figure(maco_figure(image, alpha), "class3.png")
"""

from harmonia.visualize.concepts import concept_pictures, with_pictures
from harmonia.visualize.figure import alpha_mask, figure_grid, maco_figure, normalize_image, save_figure
from harmonia.visualize.maco import (
    PRESETS,
    SMALL_INPUT_SETTINGS,
    XPLIQUE_SETTINGS,
    MacoResult,
    fourier_image,
    maco,
    objective_seed,
    run_maco,
    to_image,
)
from harmonia.visualize.objectives import ClassLogit, Channel, Concept, Direction, ModelOutputs, Objective, Sum, dot_cos
from harmonia.visualize.spectrum import IMAGENET_COLOR_CORRELATION, Spectrum, image_spectrum

__all__ = [
    "IMAGENET_COLOR_CORRELATION",
    "PRESETS",
    "SMALL_INPUT_SETTINGS",
    "XPLIQUE_SETTINGS",
    "Channel",
    "ClassLogit",
    "Concept",
    "Direction",
    "MacoResult",
    "ModelOutputs",
    "Objective",
    "Spectrum",
    "Sum",
    "alpha_mask",
    "concept_pictures",
    "dot_cos",
    "figure_grid",
    "fourier_image",
    "image_spectrum",
    "maco",
    "maco_figure",
    "normalize_image",
    "objective_seed",
    "run_maco",
    "save_figure",
    "to_image",
    "with_pictures",
]
