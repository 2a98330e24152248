"""CRAFT (Fel et al., CVPR 2023): concepts of one class from a model's activations.

Follow one class through :meth:`Craft.fit`:
1. :meth:`Craft.crops`: overlapping ``patch_size`` crops of the class images (``unfold`` with
   stride ``int(0.8·patch_size)``, as the reference; a border thinner than a stride is not
   covered);
2. :meth:`Craft.crop_activations`: each crop resized (bilinear) to the image size, sent through
   ``g`` (the model up to the split layer), spatially averaged: ``A (n_crops, channels) ≥ 0``;
3. :meth:`Craft.factorize`: ``A ≈ U W`` by the PyTorch NMF (:mod:`harmonia.concepts.nmf`, the
   reference's ``alpha_W = 1e-2``); ``W (k, channels)`` is the concept bank, ``U`` ranks crops.
   Deviation, on purpose: ``A`` is divided by its mean before the NMF (``normalize=True``).
   scikit-learn's penalty is not scale-invariant: ``alpha_W`` weighs ``‖U‖²`` against
   ``‖A − UW‖²``, so it is 100× stronger on activations of mean 0.1 than of mean 1, and an L2
   penalty then spreads every crop's mass evenly over similar concepts. Measured on the digits
   Lipschitz CNN (activations of mean ≈ 0.15): concepts with mean pairwise cosine 0.99 and 11%
   reconstruction error at the raw scale, 0.83 and 2.6% normalized. Normalized, ``alpha_W``
   means the same at any layer (tests/test_concepts.py checks the invariance);
4. :meth:`Craft.importance`: for each class image, its spatial coefficients ``u (h, w, k)``
   (NMF transform of its activations on ``W``) are masked concept-wise by a Halton design
   (``harmonia.explain.sensitivity``; one mask value per concept, broadcast over positions),
   ``h((u·M) W)`` gives the class logit, and Jansen's estimator gives total Sobol indices per
   concept; the class importance is their mean over images;
   Deviation, optional (``baseline``): the activations of an empty image are the zero of the
   concept space. Without it, a network's non-zero response to empty input (biases) is shared
   by every crop; NMF gives it a concept whose top crops are the empty ones, and masking that
   concept drives activations to zero, which no input produces, so it can rank first;
5. :meth:`ConceptBank.top_crops` and :meth:`Craft.attribution_maps` show the concepts.

Semantics follow deel-ai/xplique's ``CraftTorch``; differences: everything stays on the
model's device (GPU NMF), the model may be split at any named module (:class:`LayerSplit`),
and ``g``/``h`` are run under ``no_grad`` in batches of ``batch_size``. The paper's recursion
(re-splitting a concept at an earlier layer) is not implemented, as in the reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.concepts.nmf import nmf, nmf_transform
from harmonia.concepts.split import LayerSplit
from harmonia.explain.sensitivity import jansen_total_order, qmc_design


@dataclass
class ConceptBank:
    """The concepts of one class.

    ``components`` ``(k, channels)`` is the bank ``W``; ``coefficients`` ``(n_crops, k)`` is
    ``U``; ``crops`` ``(n_crops, C, p, p)`` are the crops as cut (not resized) and
    ``crop_source`` the index of the image each came from; ``reconstruction_error`` is
    ``‖A − UW‖_F / ‖A‖_F``; ``importance`` ``(k,)`` the mean total Sobol index, once computed;
    ``scale`` the mean activation the NMF divided by (``components`` are in activation units).
    """

    class_id: int
    components: Tensor
    coefficients: Tensor
    crops: Tensor
    crop_source: Tensor
    reconstruction_error: float
    importance: Tensor | None = None
    scale: float = 1.0  # activations were divided by this before the NMF (see Craft)

    @property
    def n_concepts(self) -> int:
        """Number of concepts ``k``."""
        return self.components.shape[0]

    def top_crops(self, n: int) -> Tensor:
        """The ``n`` crops with the largest coefficient for each concept: ``(k, n, C, p, p)``."""
        n = min(n, self.coefficients.shape[0])
        best = self.coefficients.topk(n, dim=0).indices.T.cpu()  # (k, n)
        return self.crops.cpu()[best]

    def reorder(self, order: Tensor | list[int]) -> ConceptBank:
        """The same bank with concepts in ``order`` (concept ``j`` of the result is ``order[j]``)."""
        order = torch.as_tensor(order, dtype=torch.long)
        return replace(
            self,
            components=self.components[order.to(self.components.device)],
            coefficients=self.coefficients[:, order.to(self.coefficients.device)],
            importance=None if self.importance is None else self.importance[order.to(self.importance.device)],
        )


class Craft:
    """Concept extraction and importance for a classifier cut at ``layer``.

    Args:
        model: the classifier (used in its current mode: call ``model.eval()`` first).
        layer: split layer, an index into an ``nn.Sequential`` or a module name (see
            :class:`LayerSplit`); its output must be non-negative (after a ReLU, a max or an
            L2-norm pooling, ...), as NMF requires.
        n_concepts: concepts per class ``k`` (reference: 20).
        patch_size: crop side in pixels (reference: 64 for 224-pixel images).
        nb_design: Halton design size for importance (reference: 32).
        batch_size: rows per forward of ``g`` or ``h``.
        alpha_W, max_iter, tol, seed: NMF settings (:func:`harmonia.concepts.nmf.nmf`).
        normalize: divide activations by their mean before the NMF (module doc); ``False``
            reproduces the reference's scale-dependent regularization.
        baseline: pixel value of an empty image (``0.0`` for black-background data), or
            ``None`` for the reference behaviour. When set, ``g`` of the empty image is the
            zero of the concept space: it is subtracted from every activation before the NMF
            (clamped at 0) and added back under the masked coefficients in
            :meth:`importance`. A network with biases answers an empty input with non-zero
            activations, shared by every crop; without the baseline, NMF spends a concept on
            that response, and masking it drives the activations to zero, a state that no
            input produces, so that "concept" gets a large importance (module doc).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: int | str,
        n_concepts: int = 20,
        patch_size: int = 64,
        nb_design: int = 32,
        batch_size: int = 256,
        alpha_W: float = 1e-2,
        max_iter: int = 200,
        tol: float = 1e-4,
        seed: int = 0,
        normalize: bool = True,
        baseline: float | None = None,
    ) -> None:
        if n_concepts < 1 or patch_size < 1 or batch_size < 1:
            raise ValueError("n_concepts, patch_size and batch_size must be positive")
        self.split = LayerSplit(model, layer)
        self.model = model
        self.n_concepts = n_concepts
        self.patch_size = patch_size
        self.nb_design = nb_design
        self.batch_size = batch_size
        self.nmf_args = {"alpha_W": alpha_W, "max_iter": max_iter, "tol": tol}
        self.seed = seed
        self.normalize = normalize
        self.baseline = baseline

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live (CPU for a parameter-free model)."""
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def crops(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Overlapping crops ``(n_crops, C, p, p)`` of ``images (N, C, H, W)`` and their image index."""
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        n, c, height, width = images.shape
        p = self.patch_size
        if p > min(height, width):
            raise ValueError(f"patch_size {p} is larger than the images ({height}×{width})")
        stride = max(1, int(0.8 * p))
        patches = F.unfold(images, kernel_size=p, stride=stride)  # (N, C·p·p, L)
        per_image = patches.shape[-1]
        crops = patches.transpose(1, 2).reshape(n * per_image, c, p, p)
        return crops, torch.arange(n, device=images.device).repeat_interleave(per_image)

    def _activations(self, x: Tensor) -> Tensor:
        """``g`` in batches, checked non-negative; ``(N, channels, *spatial)``."""
        out = []
        with torch.no_grad():
            for start in range(0, len(x), self.batch_size):
                out.append(self.split.activations(x[start : start + self.batch_size].to(self.device)))
        acts = torch.cat(out)
        if acts.ndim < 2:
            raise ValueError(f"activations at layer {self.split.name!r} have shape {tuple(acts.shape)}; need (N, channels, ...)")
        low = float(acts.min()) if acts.numel() else 0.0
        if low < 0:
            raise ValueError(
                f"activations at layer {self.split.name!r} ({type(self.split.module).__name__}) are negative "
                f"(min {low:.4g}); CRAFT's NMF needs non-negative activations: split after a ReLU, a max "
                "pooling or an L2-norm pooling layer"
            )
        return acts

    def blank_activations(self, shape: tuple[int, ...]) -> Tensor | None:
        """``g`` of an empty image of ``shape`` ``(C, H, W)``: ``(1, channels, *spatial)``; ``None`` without baseline."""
        if self.baseline is None:
            return None
        blank = torch.full((1, *shape), float(self.baseline), device=self.device)
        return self._activations(blank)

    def crop_activations(self, crops: Tensor, size: tuple[int, int]) -> Tensor:
        """Spatially averaged activations ``(n_crops, channels)`` of crops resized to ``size``.

        With a ``baseline``, minus those of an empty crop (clamped at 0): an empty crop gets
        a zero row, which the NMF explains with no concept.
        """
        out = []
        for start in range(0, len(crops), self.batch_size):
            batch = crops[start : start + self.batch_size].to(self.device)
            batch = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
            acts = self._activations(batch)
            out.append(acts.flatten(2).mean(-1) if acts.ndim > 2 else acts)
        acts = torch.cat(out)
        blank = self.blank_activations((crops.shape[1], *size))
        if blank is not None:
            # An empty crop resized is the empty image, so its averaged activations are these.
            acts = (acts - (blank.flatten(2).mean(-1) if blank.ndim > 2 else blank)).clamp_min(0)
        return acts

    def factorize(self, activations: Tensor, crops: Tensor, crop_source: Tensor, class_id: int) -> ConceptBank:
        """NMF of crop activations into a :class:`ConceptBank` (importance not yet computed)."""
        if len(activations) < self.n_concepts:
            raise ValueError(
                f"class {class_id}: {len(activations)} crops cannot give {self.n_concepts} concepts; "
                "use more images, a smaller patch_size or fewer concepts"
            )
        scale = float(activations.mean()) if self.normalize else 1.0
        scale = scale if scale > 0 else 1.0
        scaled = activations / scale
        result = nmf(scaled, self.n_concepts, seed=self.seed, **self.nmf_args)
        error = result.error / (float(scaled.norm()) or 1.0)
        return ConceptBank(class_id, result.components * scale, result.coefficients, crops, crop_source, error, scale=scale)

    def fit(self, images: Tensor, class_id: int, importance: bool = True) -> ConceptBank:
        """Concepts of ``images`` (all of class ``class_id``), with their importance by default."""
        crops, source = self.crops(images)
        acts = self.crop_activations(crops, tuple(images.shape[-2:]))
        bank = self.factorize(acts, crops, source, class_id)
        if importance:
            bank.importance = self.importance(bank, images).mean(0)
        return bank

    def transform(self, bank: ConceptBank, images: Tensor) -> Tensor:
        """Concept coefficients of whole images: ``(N, *spatial, k)`` (``(N, k)`` without spatial dims)."""
        acts = self._activations(images)
        blank = self.blank_activations(tuple(images.shape[1:]))
        if blank is not None:
            acts = (acts - blank).clamp_min(0)  # position by position: padding makes the empty response uneven
        channels_last = acts.movedim(1, -1)
        rows = channels_last.reshape(-1, acts.shape[1]) / bank.scale
        u = nmf_transform(rows, bank.components / bank.scale, **self.nmf_args)
        return u.reshape(*channels_last.shape[:-1], bank.n_concepts)

    def importance(self, bank: ConceptBank, images: Tensor) -> Tensor:
        """Total Sobol index of each concept for each image's class logit: ``(N, k)``.

        Masks: a Halton design over the ``k`` concepts (``nb_design · (k + 2)`` rows,
        :func:`harmonia.explain.sensitivity.qmc_design`); scores: the logit of
        ``bank.class_id`` from ``h((u ⊙ m) W)`` (``h(g(blank) + (u ⊙ m) W)`` with a ``baseline``);
        estimator: Jansen's total order.
        """
        masks = qmc_design(self.nb_design, bank.n_concepts, "halton").to(self.device)
        return torch.cat([
            jansen_total_order(logits[..., bank.class_id].T, self.nb_design).T
            for logits in self._masked_logits(bank, images, masks)
        ])

    def class_effects(self, bank: ConceptBank, images: Tensor) -> Tensor:
        """How much each concept raises every class logit in each image: ``(N, k, classes)``.

        ``h(U W) − h(U₋ⱼ W)``: the logits of the image's reconstructed activations minus those
        with concept ``j`` removed (its coefficients set to 0, the masking :meth:`importance`
        uses). With a linear head right after the concept layer this is ``uⱼ · ⟨Wⱼ, w_class⟩``,
        the head-weight alignment LENS shows, weighted by how present the concept is.
        """
        k = bank.n_concepts
        masks = torch.ones(k + 1, k, device=self.device)
        masks[1:].fill_diagonal_(0.0)  # row 0: every concept; row j + 1: all but concept j
        return torch.cat([logits[:, :1] - logits[:, 1:] for logits in self._masked_logits(bank, images, masks)])

    def coefficient_logits(self, bank: ConceptBank, u: Tensor, shape: tuple[int, ...], inputs: Tensor | None = None,
                           blank: Tensor | None = None) -> Tensor:
        """``h(g(blank) + u W)``: float32 logits ``(N, classes)`` of the activations rebuilt from
        coefficients ``u`` ``(N, *S, k)`` (as :meth:`transform` gives them) of images of
        ``shape`` ``(C, H, W)``. ``inputs``: the images themselves, row by row with ``u``, which
        only a layer whose head reads the input needs. No ``g(blank)`` without a baseline;
        ``blank``: it, already computed.
        """
        if self.split.needs_input and inputs is None:
            raise ValueError(f"layer {self.split.name!r}: the head reads the input; pass the images as inputs")
        w = bank.components.to(self.device, u.dtype)
        if blank is None:
            blank = self.blank_activations(tuple(shape))
        out = []
        with torch.no_grad():
            for s in range(0, len(u), self.batch_size):
                acts = (u[s : s + self.batch_size].to(self.device) @ w).movedim(-1, 1)
                if blank is not None:
                    acts = acts + blank.to(acts.dtype)  # a missing concept reads as empty image there
                x = inputs[s : s + self.batch_size].to(self.device) if self.split.needs_input else None
                out.append(self.split.logits(acts, x).float())
        return torch.cat(out)

    def _masked_logits(self, bank: ConceptBank, images: Tensor, masks: Tensor) -> Iterator[Tensor]:
        """``h(g(blank) + (u ⊙ m) W)`` for every image and mask row, a chunk of images at a time:
        ``(images in the chunk, rows, classes)`` float32 logits (no ``g(blank)`` without a baseline)."""
        k = bank.n_concepts
        rows = len(masks)
        u = self.transform(bank, images)  # (N, *S, k)
        spatial = u.shape[1:-1]
        per_chunk = max(1, self.batch_size // rows)
        shape = tuple(images.shape[1:])
        blank = self.blank_activations(shape)
        for start in range(0, len(u), per_chunk):
            chunk = u[start : start + per_chunk]
            c = len(chunk)
            masked = chunk[:, None] * masks.view(1, rows, *[1] * len(spatial), k).to(u.dtype)
            inputs = None
            if self.split.needs_input:  # one copy of each image per mask row, only where the head reads it
                x = images[start : start + c]
                inputs = x[:, None].expand(c, rows, *x.shape[1:]).reshape(c * rows, *x.shape[1:])
            yield self.coefficient_logits(bank, masked.reshape(c * rows, *spatial, k), shape, inputs, blank).view(c, rows, -1)

    def attribution_maps(self, bank: ConceptBank, images: Tensor) -> Tensor:
        """Where each concept is in each image: ``(N, k, H, W)`` ≥ 0.

        The image's spatial coefficients ``u (h, w, k)`` resized to the image with bicubic
        interpolation (as the reference displays them), negatives from the interpolation clipped.
        """
        u = self.transform(bank, images)
        if u.ndim != 4:
            raise ValueError(f"layer {self.split.name!r} has no 2-D spatial activations; attribution maps need them")
        maps = F.interpolate(u.permute(0, 3, 1, 2), size=images.shape[-2:], mode="bicubic", align_corners=False)
        return maps.clamp_min(0)
