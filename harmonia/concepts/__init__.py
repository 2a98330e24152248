"""CRAFT concepts (plain PyTorch): split a model, factorize activations, rank and show concepts."""

from harmonia.concepts.craft import ConceptBank, Craft
from harmonia.concepts.drift import ConceptMatching, match_concepts
from harmonia.concepts.mosaic import attribution_overlay, concept_color, concept_mosaic
from harmonia.concepts.nmf import NMFResult, nmf, nmf_transform
from harmonia.concepts.split import LayerSplit

__all__ = [
    "ConceptBank",
    "ConceptMatching",
    "Craft",
    "LayerSplit",
    "NMFResult",
    "attribution_overlay",
    "concept_color",
    "concept_mosaic",
    "match_concepts",
    "nmf",
    "nmf_transform",
]
