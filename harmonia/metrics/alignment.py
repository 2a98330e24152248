"""Human alignment: does the model's saliency rank pixels as people's maps do?

Reference: serre-lab/harmonization's ClickMe evaluation. Per image, the Spearman rank
correlation between the saliency map and the human map over all pixels; the mean over images;
the paper's *alignment score* divides that mean by 0.65753, the human inter-rater ceiling.
"""

from __future__ import annotations

import torch
from torch import Tensor

from harmonia.metrics.base import SampleMean, as_map
from harmonia.metrics.correlation import spearman_rows

HUMAN_CEILING = 0.65753


def human_alignment(saliency: Tensor, human_maps: Tensor) -> Tensor:
    """Per-image Spearman correlation ``(N,)`` between saliency and human maps, both ``(N,1,H,W)``."""
    human = as_map(human_maps, tuple(human_maps.shape[-2:]), "human maps")
    if (human < 0).any():
        raise ValueError("human maps must be >= 0 (a negative importance is an input error)")
    saliency = as_map(saliency, tuple(human.shape[-2:]), "saliency maps")
    if len(saliency) != len(human):
        raise ValueError(f"{len(saliency)} saliency maps for {len(human)} human maps")
    return spearman_rows(saliency.flatten(1), human.flatten(1))


class HumanAlignment(SampleMean):
    """Mean per-image Spearman correlation between explanations and human maps.

    ``compute()`` returns ``{"spearman": mean ρ, "score": mean ρ / 0.65753}`` (the paper's
    alignment score, human ceiling ``ceiling``). Samples whose ``has_map`` is False are skipped;
    with no mapped sample at all the values are NaN (nothing was measured). A constant map has no
    ranking and counts as ρ = 0 (see ``spearman_rows``).
    """

    needs = ("explanations", "human_maps", "has_map")
    higher_is_better = True

    def __init__(self, ceiling: float = HUMAN_CEILING, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 < ceiling <= 1:
            raise ValueError(f"ceiling must lie in (0, 1]; got {ceiling}")
        self.ceiling = float(ceiling)

    def update(self, explanations: Tensor, human_maps: Tensor, has_map: Tensor | None = None) -> None:
        """Add the correlations of the mapped samples of a batch."""
        if has_map is not None:
            keep = torch.as_tensor(has_map, device=explanations.device).bool()
            explanations, human_maps = explanations[keep], human_maps[keep.to(human_maps.device)]
        if len(explanations) == 0:
            return
        self.add(human_alignment(explanations, human_maps))

    def compute(self) -> dict[str, Tensor]:
        """``{"spearman", "score"}``: batch mean ρ and ρ / ceiling."""
        mean = super().compute()
        return {"spearman": mean, "score": mean / self.ceiling}
