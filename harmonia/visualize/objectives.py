"""What MACO maximizes: small composable objectives scored on a batch of crops.

An objective reads the model's outputs for the crops of *its own* image (``n`` rows) and
returns one score per crop; MACO maximizes their mean. Objectives add, subtract and scale
(``ClassLogit(3) - 0.5 * ClassLogit(5)``). Layers are named as in
:class:`harmonia.concepts.LayerSplit`: an index into an ``nn.Sequential`` or a module name.

The direction objectives use the "dot × cosine^k" score of Lucid (tensorflow/lucid issue
#116), as xplique (``Objective.direction``) and horama (``losses.dot_cossim``) do: the dot
product rewards a strong activation, the cosine power an activation that points the right
way. One deviation: the references multiply each crop's cosine by the dot product summed
over *all* crops; here each crop's own dot product is used, so an objective's score does not
depend on how many other crops (or objectives) share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from harmonia.concepts import ConceptBank, Craft

Layer = int | str


@dataclass
class ModelOutputs:
    """The logits of a batch of crops and the activations captured at named layers."""

    logits: Tensor | None
    activations: dict[Layer, Tensor] = field(default_factory=dict)

    def rows(self, start: int, stop: int) -> ModelOutputs:
        """The outputs of crops ``start:stop`` only."""
        return ModelOutputs(
            None if self.logits is None else self.logits[start:stop],
            {k: v[start:stop] for k, v in self.activations.items()},
        )

    def activation(self, layer: Layer) -> Tensor:
        """The captured output of ``layer``."""
        if layer not in self.activations:
            raise KeyError(f"layer {layer!r} was not captured (captured: {list(self.activations)})")
        return self.activations[layer]


class Objective:
    """Base class: ``score(outputs) -> (n_crops,)``; ``layers`` and ``needs_logits`` say what to capture."""

    layers: tuple[Layer, ...] = ()
    needs_logits: bool = False
    name: str = "objective"

    def score(self, outputs: ModelOutputs) -> Tensor:
        """One score per crop, ``(n,)``; MACO maximizes their mean."""
        raise NotImplementedError

    def __add__(self, other: Objective) -> Objective:
        return Sum([(1.0, self), (1.0, _objective(other))])

    def __sub__(self, other: Objective) -> Objective:
        return Sum([(1.0, self), (-1.0, _objective(other))])

    def __mul__(self, factor: float) -> Objective:
        if not isinstance(factor, (int, float)):
            return NotImplemented
        return Sum([(float(factor), self)])

    __rmul__ = __mul__

    def __truediv__(self, factor: float) -> Objective:
        return self * (1.0 / factor)

    def __neg__(self) -> Objective:
        return self * -1.0

    def __repr__(self) -> str:
        return self.name


def _objective(x: object) -> Objective:
    if not isinstance(x, Objective):
        raise TypeError(f"can only combine objectives with objectives, not {type(x).__name__}")
    return x


class Sum(Objective):
    """``Σ weight · objective`` (what ``+``, ``-`` and ``*`` build)."""

    def __init__(self, terms: Sequence[tuple[float, Objective]]) -> None:
        flat: list[tuple[float, Objective]] = []
        for weight, term in terms:
            if isinstance(term, Sum):  # keep one level: (a + b) + c has three terms
                flat += [(weight * w, t) for w, t in term.terms]
            else:
                flat.append((float(weight), _objective(term)))
        if not flat:
            raise ValueError("a sum of objectives needs at least one term")
        self.terms = flat
        self.layers = tuple(dict.fromkeys(layer for _, t in flat for layer in t.layers))
        self.needs_logits = any(t.needs_logits for _, t in flat)
        self.name = " ".join(
            (f"{'-' if w < 0 else ('+' if i else '')}{'' if abs(w) == 1 else f'{abs(w):g}·'}{t.name}") for i, (w, t) in enumerate(flat)
        )

    def score(self, outputs: ModelOutputs) -> Tensor:
        """Weighted sum of the terms' scores."""
        return sum(w * t.score(outputs) for w, t in self.terms)


class ClassLogit(Objective):
    """The logit of class ``class_id``."""

    needs_logits = True

    def __init__(self, class_id: int) -> None:
        self.class_id = int(class_id)
        self.name = f"class {self.class_id}"

    def score(self, outputs: ModelOutputs) -> Tensor:
        """``logits[:, class_id]``."""
        if outputs.logits is None:
            raise ValueError("ClassLogit needs the model's logits")
        if outputs.logits.ndim != 2 or not 0 <= self.class_id < outputs.logits.shape[1]:
            raise ValueError(f"class {self.class_id} is not a column of logits of shape {tuple(outputs.logits.shape)}")
        return outputs.logits[:, self.class_id]


class Channel(Objective):
    """The mean activation of ``channel`` at ``layer`` (over spatial positions, if any)."""

    def __init__(self, layer: Layer, channel: int) -> None:
        self.layers = (layer,)
        self.layer, self.channel = layer, int(channel)
        self.name = f"{layer}:{self.channel}"

    def score(self, outputs: ModelOutputs) -> Tensor:
        """``act[:, channel]`` averaged over positions."""
        act = outputs.activation(self.layer)
        if act.ndim < 2 or not 0 <= self.channel < act.shape[1]:
            raise ValueError(f"channel {self.channel} is outside layer {self.layer!r}'s output of shape {tuple(act.shape)}")
        return act[:, self.channel].flatten(1).mean(1) if act.ndim > 2 else act[:, self.channel]


def dot_cos(activations: Tensor, direction: Tensor, power: float = 2.0, eps: float = 1e-6) -> Tensor:
    """``⟨a, d⟩ · max(cos(a, d), eps)^power`` per row of ``activations`` ``(n, D)`` against ``direction`` ``(D,)``."""
    direction = direction.to(activations)
    dot = activations @ direction
    cos = F.cosine_similarity(activations, direction[None], dim=1)
    return dot * cos.clamp_min(eps) ** power


class Direction(Objective):
    """A direction ``vector`` (one value per channel) at ``layer``, scored by :func:`dot_cos`.

    Args:
        layer: layer name or index.
        vector: ``(channels,)``.
        cos_power: ``k`` in ``dot · cos^k`` (references: 2).
        pool: average the activation over spatial positions first (the CRAFT concept space);
            ``False`` compares the whole ``(C, h, w)`` activation with the vector repeated at
            every position.
    """

    def __init__(self, layer: Layer, vector: Tensor, cos_power: float = 2.0, pool: bool = True, name: str | None = None) -> None:
        vector = torch.as_tensor(vector, dtype=torch.float32).detach()
        if vector.ndim != 1 or not torch.isfinite(vector).all() or not vector.abs().sum() > 0:
            raise ValueError(f"a direction must be a finite, non-zero 1-D vector; got shape {tuple(vector.shape)}")
        self.layers = (layer,)
        self.layer, self.vector, self.cos_power, self.pool = layer, vector, float(cos_power), pool
        self.name = name or f"direction@{layer}"

    def score(self, outputs: ModelOutputs) -> Tensor:
        """``dot · cos^k`` of each crop's (pooled) activation with the vector."""
        act = outputs.activation(self.layer)
        if act.ndim < 2 or act.shape[1] != len(self.vector):
            raise ValueError(f"layer {self.layer!r} has output {tuple(act.shape)}; the direction has {len(self.vector)} channels")
        if act.ndim == 2:
            return dot_cos(act, self.vector, self.cos_power)
        if self.pool:
            return dot_cos(act.flatten(2).mean(-1), self.vector, self.cos_power)
        spatial = act.shape[2:]
        full = self.vector.to(act).view(-1, *[1] * len(spatial)).expand(act.shape[1:])
        return dot_cos(act.flatten(1), full.flatten(), self.cos_power)


class Concept(Direction):
    """A CRAFT concept: its NMF component (a row of ``bank.components``) at the concept layer.

    ``layer`` must be the layer the bank was factorized at (``Craft``'s ``layer``); use
    :meth:`of` to take it from the ``Craft`` object. The score is :func:`dot_cos` of the
    spatially averaged activation with the component, the space CRAFT's NMF works in.
    """

    def __init__(self, layer: Layer, bank: ConceptBank, concept: int, cos_power: float = 2.0) -> None:
        if not 0 <= concept < bank.n_concepts:
            raise ValueError(f"concept {concept} is outside the bank's {bank.n_concepts} concepts")
        super().__init__(layer, bank.components[concept].detach().float().cpu(), cos_power, pool=True,
                         name=f"class {bank.class_id} concept {concept}")
        self.concept = concept

    @classmethod
    def of(cls, craft: Craft, bank: ConceptBank, concept: int, cos_power: float = 2.0) -> Concept:
        """The concept objective at ``craft``'s layer."""
        return cls(craft.split.layer, bank, concept, cos_power)
