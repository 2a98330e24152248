"""The atlas's per-class analysis: what a model sees in one class, and the CLASS document of it.

:func:`analyze_class` runs, for one class's images, the project's own tools (nothing here is a
second copy of them):

- concepts: :class:`harmonia.concepts.Craft` (crops → NMF bank → total Sobol importance per
  image), renumbered by importance (concept 0 = most important); a concept's ``importance`` is
  its share of the summed Sobol indices; each image's *top concept* is the one with its largest
  index; a concept is *important* when it is the top concept of at least
  ``important_min_share`` of the images (LENS counts a concept that is the top concept of ≥ 10
  images);
- per concept: its MACO picture (:func:`harmonia.visualize.concept_pictures`, drawn on the
  class's own spectrum, :meth:`Spectrum.from_images`), top crops (:meth:`ConceptBank.top_crops`),
  where it sits (:meth:`Craft.attribution_maps` tinted by
  :func:`harmonia.concepts.attribution_overlay`), and the classes it drives most: how much
  each class logit drops when the concept is removed from the images' reconstructed
  activations (:meth:`Craft.class_effects`, mean over the class's images). LENS ranks classes
  by the cosine of the concept with their head weights, which only means something on the layer
  that feeds the head; the removal effect equals the presence-weighted head alignment there and
  stays meaningful at any layer. (A cosine with each logit's gradient was tried: NMF concepts
  are non-negative, so it ranked the classes whose gradient has the largest positive mean first
  for every concept of every class.);
- shortcut flags: the share of a concept's attribution mass (summed over the class's mapped
  images) on pixels *outside* the human map (map value < ``map_threshold`` × the image's map
  maximum); a concept with ``importance ≥ flag_importance`` and ``off-map share ≥
  flag_off_map`` is flagged. The mass is, by default, the concept's *contribution* to the class
  logit at each position (:func:`contribution_maps`: its coefficient times the logit's gradient
  along the concept vector, gradient × input in concept space), not its *presence* (the
  coefficients alone, :meth:`Craft.attribution_maps`, which the tints show). Why: on the decoy
  digits no concept is the decoy alone. The decoy's activations share the concept of the
  digit's bright strokes, whose presence spreads over the whole digit, so its presence map puts
  17% of its mass near the decoy and looks like any digit concept; the class logit, however,
  reads that concept mostly at the decoy, and the contribution map puts 75% there
  (decoy-trained CNN, classes 0 and 1);
- the background swap (:func:`background_swap`): the class's accuracy when everything off the
  human maps comes from images of other classes. The concept flags are local (a derivative
  times a presence) and miss a model that reads a *faint* pattern: the decoy-trained CNN's
  classes 8 and 9, whose decoy squares are the darkest, lose 30–50 accuracy points when the
  decoy is repainted, yet no concept there has a mostly off-map contribution. The swap is a
  counterfactual and sees them; a class whose accuracy falls by ``flag_background`` or more is
  flagged as background-reliant;
- ``profile`` ``(k, n_crops)``: each concept's NMF coefficients on the class's crops. The same
  images cut with the same patch size give the same crops whatever the model, so this row is a
  signature that does not depend on the model's channel space: :func:`compare_section` and
  :func:`timeline_section` match concepts of two models or checkpoints by it
  (:func:`harmonia.concepts.match_concepts`, Hungarian assignment on cosine);
- a 2-D map of the images by their concept-importance vectors (scikit-learn t-SNE when there
  are at least ``tsne_min_images`` images, PCA below);
- saliency examples with the model's own training saliency (the saliency object of its
  harmonization penalty, found as ``SaliencyMonitor``'s method ``training`` finds it) or
  :class:`harmonia.explain.Saliency` for a model without one, scored against the human maps
  (:func:`harmonia.metrics.human_alignment`);
- certified radii (:func:`harmonia.metrics.certified_radius`) when the model carries a
  Lipschitz certificate.

:func:`class_document` writes the PNGs and returns the CLASS document of
:mod:`harmonia.atlas.schema` (paths relative to the atlas folder).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.atlas.schema import SCHEMA_VERSION, validate
from harmonia.callbacks.feature_viz import maco_settings
from harmonia.callbacks.monitor import eval_mode
from harmonia.callbacks.saliency import TrainingSaliency
from harmonia.concepts import ConceptBank, Craft, attribution_overlay, concept_color, match_concepts
from harmonia.explain import Saliency
from harmonia.explain.base import Explainer, gradients_on
from harmonia.metrics.alignment import human_alignment
from harmonia.metrics.certified import CertifiedAccuracy, certified_radius, model_certificate
from harmonia.models.orthogonal import cached_weights
from harmonia.visualize import Spectrum, concept_pictures, objective_seed
from harmonia.visualize.figure import save_figure

PICTURE_SIDE = 96  # small images are nearest-upscaled to at least this many pixels, so a 32-px digit is visible


@dataclass
class AtlasSettings:
    """Every knob of the per-class analysis (``asdict`` goes into the INDEX ``settings`` and the cache key).

    Args:
        layer: concept layer (index into an ``nn.Sequential`` or module name); its output must be
            non-negative. ``9`` is the second pooling of the digits CNNs (64×8×8).
        n_concepts: CRAFT concepts per class.
        images_per_class: images the command analyses per class (it selects them).
        patch_size: crop side in pixels (stride ``int(0.8·patch_size)``).
        nb_design: Halton design size of the Sobol importance.
        top_crops: crops kept per concept.
        tint_images: class images shown with each concept's attribution tint.
        saliency_images: saliency examples per class.
        maco: draw each concept's MACO picture.
        maco_steps: MACO optimization steps (the monitors' defaults otherwise).
        baseline: pixel value of an empty image (``0.0``: black background), the zero of the
            concept space (:class:`harmonia.concepts.Craft`); ``None``: the reference CRAFT.
        map_threshold: a pixel is off the human map when its map value is below this fraction
            of the image's map maximum.
        off_map_maps: which concept maps the off-map share weighs: ``"contribution"`` (where the
            concept drives the class logit, :func:`contribution_maps`) or ``"presence"`` (where
            the concept is, :meth:`Craft.attribution_maps`; on the decoy digits it does not single
            out the decoy, see the module doc).
        flag_importance, flag_off_map: a concept is flagged when its importance share and its
            off-map share reach both: a tenth of the class's importance, and most (half) of its
            contribution off the human maps. On the decoy digits' training images (64 a class,
            seed 0) this flags classes 0, 1, 3 of the decoy-trained CNN and class 1 of the
            decoy-trained 1-Lipschitz CNN (the classes where painting the decoy black costs the
            most accuracy: 97, 98, 71 and 50 points), one class of the harmonized CNN (an
            off-map background concept, importance 0.10) and none of ``configs/digits.yaml``.
        background_donors: images of other classes whose background each image is shown with in
            the background swap (:func:`background_swap`); 0 turns the swap off.
        flag_background: a class is flagged as background-reliant when the swap lowers its
            accuracy by at least this much (0.10: ten points).
        background_carrier: in a background-reliant class, the concept with the largest share of
            the swap's logit drop (:func:`background_concepts`) is named as carrying it when its
            share reaches this (a quarter: below, no single concept stands out).
        important_min_share: a concept counts as important when it is the top concept of at
            least this share of the class's images.
        split: data split the images come from (the command reads it).
        seed: NMF, MACO and t-SNE seed.
        epsilons: L2 radii of the certified accuracy (1-Lipschitz models).
        top_classes: classes listed per concept (those it drives most).
        tsne_min_images: t-SNE from this many images on, PCA below (t-SNE on a handful of
            points only shows its own noise).
        batch_size: rows per forward.
    """

    layer: int | str = 9
    n_concepts: int = 6
    images_per_class: int = 64
    patch_size: int = 12
    nb_design: int = 16
    top_crops: int = 6
    tint_images: int = 4
    saliency_images: int = 4
    maco: bool = True
    maco_steps: int = 64
    baseline: float | None = 0.0
    map_threshold: float = 0.1
    off_map_maps: str = "contribution"
    flag_importance: float = 0.1
    flag_off_map: float = 0.5
    background_donors: int = 4
    flag_background: float = 0.1
    background_carrier: float = 0.25
    important_min_share: float = 0.1
    split: str = "train"
    seed: int = 0
    epsilons: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5)
    top_classes: int = 5
    tsne_min_images: int = 20
    batch_size: int = 256

    def __post_init__(self) -> None:
        self.epsilons = tuple(float(e) for e in self.epsilons)
        for name in ("n_concepts", "images_per_class", "patch_size", "nb_design", "top_crops", "maco_steps",
                     "top_classes", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AtlasSettings.{name} must be >= 1; got {getattr(self, name)}")
        for name in ("tint_images", "saliency_images", "tsne_min_images", "background_donors"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"AtlasSettings.{name} must be >= 0; got {getattr(self, name)}")
        for name in ("map_threshold", "flag_importance", "flag_off_map", "flag_background", "background_carrier",
                     "important_min_share"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"AtlasSettings.{name} must lie in [0, 1]; got {getattr(self, name)}")
        if self.off_map_maps not in ("contribution", "presence"):
            raise ValueError(f"AtlasSettings.off_map_maps must be 'contribution' or 'presence'; got {self.off_map_maps!r}")
        if any(e < 0 or not math.isfinite(e) for e in self.epsilons):
            raise ValueError(f"AtlasSettings.epsilons must be finite and >= 0; got {list(self.epsilons)}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready settings (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class ClassAnalysis:
    """Everything a CLASS document needs, as CPU tensors and plain values (``torch.save``-able).

    Concepts are in rank order (0 = most important). ``N`` images, ``k`` concepts, ``K`` classes.
    """

    class_id: int
    name: str
    class_names: list[str]
    settings: dict[str, Any]
    images: Tensor  # (N, C, H, W) in [0, 1]
    labels: Tensor  # (N,)
    maps: Tensor | None  # (N, 1, H, W) human maps; None without any
    has_map: Tensor  # (N,) bool: the image has a (non-empty) human map
    predicted: Tensor  # (N,)
    accuracy: float
    components: Tensor  # (k, channels) concept vectors at the layer
    profile: Tensor  # (k, n_crops) concept coefficients on the class's crops (the matching signature)
    sobol: Tensor  # (k,) mean total Sobol index
    importance: Tensor  # (k,) share of the summed Sobol indices
    per_image: Tensor  # (N, k) total Sobol index per image
    top_concept: Tensor  # (N,) each image's top concept
    n_top_images: Tensor  # (k,) images whose top concept it is
    n_important: int
    reconstruction_error: float
    top_crops: Tensor  # (k, n, C, p, p)
    pictures: Tensor | None  # (k, C, H, W) MACO pictures; None when MACO is off
    tint_maps: Tensor  # (t, k, H, W) attribution maps of the first t images
    class_effect: Tensor  # (k, K) mean rise of each class logit due to each concept (Craft.class_effects)
    off_map: Tensor | None  # (k,) off-map share of each concept's attribution mass
    flagged: Tensor  # (k,) bool
    proximity: Tensor  # (k, k) cosine between concept vectors
    embedding: Tensor  # (N, 2) in [0, 1]
    embedding_method: str  # "tsne" or "pca"
    saliency: Tensor  # (s, 1, H, W) saliency of the first s images
    alignment: Tensor | None  # (N,) per-image human alignment (NaN where an image has no map); None without maps
    certified: dict[str, Any] | None = None  # {"epsilons", "accuracy", "radii" (N,)}
    background: dict[str, Any] | None = None  # background_swap's result; None without maps or donors

    @property
    def n_concepts(self) -> int:
        """Number of concepts ``k``."""
        return int(self.components.shape[0])

    @property
    def mean_alignment(self) -> float | None:
        """Mean human alignment over the mapped images; ``None`` without maps."""
        if self.alignment is None:
            return None
        valid = self.alignment[~self.alignment.isnan()]
        return float(valid.mean()) if len(valid) else None


# The cache holds analyses with torch.save; torch.load's default (weights_only) unpickler accepts
# only allow-listed classes, and a ClassAnalysis holds nothing but tensors and plain values.
torch.serialization.add_safe_globals([ClassAnalysis])


# ----- pieces with their own tests ----------------------------------------------------------


def off_map_share(attributions: Tensor, maps: Tensor, threshold: float, has_map: Tensor | None = None) -> Tensor | None:
    """Share of each concept's attribution mass on pixels outside the human maps: ``(k,)`` in [0, 1].

    ``attributions`` ``(N, k, H, W)`` ≥ 0; ``maps`` ``(N, 1, H, W)``. A pixel of image ``i`` is
    outside when its map value is below ``threshold × maps[i].max()``. Images without a map
    (``has_map`` False, or an all-zero map) are left out; ``None`` when none is left. A concept
    with no mass at all gets 0.
    """
    if attributions.ndim != 4 or maps.ndim != 4 or maps.shape[1] != 1 or len(maps) != len(attributions) \
            or maps.shape[-2:] != attributions.shape[-2:]:
        raise ValueError(f"attributions {tuple(attributions.shape)} must be (N, k, H, W) and maps {tuple(maps.shape)} (N, 1, H, W) alike")
    peak = maps.flatten(1).amax(1)
    keep = peak > 0
    if has_map is not None:
        keep = keep & has_map.to(keep.device).bool()
    if not keep.any():
        return None
    attributions, maps, peak = attributions[keep].float(), maps[keep].float(), peak[keep].float()
    outside = (maps < threshold * peak.view(-1, 1, 1, 1)).float()  # (n, 1, H, W)
    total = attributions.sum(dim=(0, 2, 3))
    off = (attributions * outside).sum(dim=(0, 2, 3))
    return torch.where(total > 0, off / total.clamp_min(1e-30), torch.zeros_like(total)).clamp(0, 1)


def flag_concepts(importance: Tensor, off_map: Tensor | None, flag_importance: float, flag_off_map: float) -> Tensor:
    """``(k,)`` bool: important (share ≥ ``flag_importance``) and mostly off-map (≥ ``flag_off_map``); none without maps."""
    if off_map is None:
        return torch.zeros(len(importance), dtype=torch.bool)
    return (importance >= flag_importance) & (off_map >= flag_off_map)


def on_map(maps: Tensor, threshold: float) -> Tensor:
    """``(N, 1, H, W)`` bool: pixels whose map value reaches ``threshold × `` the image's map maximum
    (the complement of what :func:`off_map_share` counts as off-map; nothing for an all-zero map)."""
    peak = maps.flatten(1).amax(1).view(-1, 1, 1, 1)
    return (maps >= threshold * peak) & (peak > 0)


def background_swap(
    net: nn.Module,
    images: Tensor,
    maps: Tensor,
    class_id: int,
    donors: Tensor,
    donor_maps: Tensor,
    threshold: float,
    per_image: int,
    flag: float,
    seed: int = 0,
    examples: int = 4,
    batch_size: int = 256,
    concepts: Callable[[Tensor, Tensor], Tensor] | None = None,
    predicted: Tensor | None = None,
) -> dict[str, Any] | None:
    """How much the class's accuracy depends on what lies *outside* the human maps.

    Each mapped image keeps every pixel on its own human map or on the donor's, and takes the
    rest (the background of both) from ``per_image`` images of *other* classes (``donors``,
    drawn with ``seed``, without replacement when there are enough), so no stroke of the
    donor's object is pasted in. A model that reads only what people look at keeps its
    predictions; one that reads a shortcut in the background (a decoy square, a watermark, a
    typical backdrop) follows the donor's. Unlike the off-map
    share of concept attributions this is a counterfactual, not a local derivative: it also
    sees a model that reads a *dark* or missing pattern, where gradients are zero (the
    decoy-trained CNN's classes 8 and 9, benchmarks/README.md).

    Returns ``{"images", "donors", "accuracy", "swapped_accuracy", "drop", "drop_interval",
    "flagged", "originals", "examples", "example_original", "example_predicted"}``: ``drop`` =
    accuracy − swapped accuracy (its normal 95% interval over the images in ``drop_interval``),
    flagged when ``≥ flag``; the first ``examples`` mapped images
    (``originals``, ``(e, C, H, W)``) with their first donor's background (``examples``) and
    the predictions on both. With ``concepts`` (``(originals (n, C, H, W), composites (m·n, C,
    H, W), draw-major) → (k,)``, e.g. :func:`background_concepts`), also ``"concept_share"``: its
    result as a list. ``predicted`` ``(N,)``: the model's predictions on ``images`` when they are
    already known (they are not computed again). ``None`` when no image or no donor has a map.
    """
    if images.ndim != 4 or maps.shape != (len(images), 1, *images.shape[-2:]):
        raise ValueError(f"background swap: images {tuple(images.shape)} need maps (N, 1, H, W); got {tuple(maps.shape)}")
    if donors.shape[1:] != images.shape[1:] or donor_maps.shape != (len(donors), 1, *images.shape[-2:]):
        raise ValueError(f"background swap: donors {tuple(donors.shape)} and their maps {tuple(donor_maps.shape)} "
                         f"must match the images {tuple(images.shape)}")
    mapped = maps.flatten(1).amax(1) > 0
    donor_mapped = donor_maps.flatten(1).amax(1) > 0
    if per_image < 1 or not mapped.any() or not donor_mapped.any():
        return None
    x, keep = images[mapped], on_map(maps[mapped], threshold)
    pool, pool_keep = donors[donor_mapped], on_map(donor_maps[donor_mapped], threshold)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + int(class_id))
    if len(pool) >= len(x) * per_image:  # every composite gets a donor of its own
        draws = torch.randperm(len(pool), generator=generator)[: len(x) * per_image].view(len(x), per_image)
    else:
        draws = torch.randint(len(pool), (len(x), per_image), generator=generator)
    device = next((q.device for q in net.parameters()), x.device)

    def predict(batch: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([net(batch[s : s + batch_size].to(device)).argmax(1).cpu() for s in range(0, len(batch), batch_size)])

    original = predict(x) if predicted is None else predicted.cpu()[mapped.cpu()]
    swapped = []
    for j in range(per_image):
        d = draws[:, j]
        swapped.append(torch.where(keep | pool_keep[d], x, pool[d]))
    composites = torch.cat(swapped)  # draw-major: composites[j * n + i] is image i with its j-th donor
    on_swapped = predict(composites)
    accuracy = float((original == class_id).float().mean())
    swapped_accuracy = float((on_swapped == class_id).float().mean())
    # Per image: correct before, minus the share of its composites still correct. Their mean is
    # the drop; their spread gives a normal 95% interval, so a drop at the threshold on a few
    # dozen images reads as the coin toss it is.
    per_image_drop = (original == class_id).double() - (on_swapped.view(per_image, -1) == class_id).double().mean(0)
    drop = accuracy - swapped_accuracy
    half = 1.96 * float(per_image_drop.std(unbiased=True)) / math.sqrt(len(x)) if len(x) > 1 else math.inf
    interval = [max(-1.0, drop - half), min(1.0, drop + half)]
    shown = min(examples, len(x))
    share = None if concepts is None else [float(v) for v in concepts(x, composites)]
    return {"images": int(len(x)), "donors": int(per_image), "accuracy": accuracy, "swapped_accuracy": swapped_accuracy,
            "drop": drop, "drop_interval": interval, "flagged": bool(drop >= flag), "concept_share": share,
            "originals": x[:shown].clone(), "examples": composites[:shown].clone(),
            "example_original": original[:shown].tolist(), "example_predicted": on_swapped[:shown].tolist()}


def background_concepts(craft: Craft, bank: ConceptBank, class_id: int, originals: Tensor, composites: Tensor) -> Tensor:
    """Which concepts carry a background swap's effect: ``(k,)``, each concept's share of the drop.

    In concept space, the class logit of the composites' reconstructed activations (``h(U_s W)``)
    against that of the originals' (``h(U_o W)``, each original repeated for its composites);
    concept ``j``'s share is how much of that drop comes back when only its coefficients are
    restored to the original's (``U_s`` with column ``j`` from ``U_o``), summed over the images.
    Shares need not sum to 1 (the head is not additive); all 0 when the reconstruction shows no
    drop. On the decoy-trained CNN one concept takes about half of the drop in each decoy class.
    """
    repeat = len(composites) // len(originals)
    if repeat < 1 or repeat * len(originals) != len(composites):
        raise ValueError(f"background concepts: {len(composites)} composites for {len(originals)} images (need a multiple)")
    u_orig = craft.transform(bank, originals)  # (n, *S, k): with or without spatial dims
    u_orig = u_orig.repeat(repeat, *[1] * (u_orig.dim() - 1))
    u_swap = craft.transform(bank, composites)

    shape = tuple(composites.shape[1:])
    blank = craft.blank_activations(shape)  # once for the k + 2 passes below

    def logit(u: Tensor) -> Tensor:
        return craft.coefficient_logits(bank, u, shape, composites, blank)[:, class_id].double()

    swapped = logit(u_swap)
    total = float((logit(u_orig) - swapped).sum())
    if not total > 0:
        return torch.zeros(bank.n_concepts)
    shares = []
    for j in range(bank.n_concepts):
        mixed = u_swap.clone()
        mixed[..., j] = u_orig[..., j]
        shares.append(float((logit(mixed) - swapped).sum()) / total)
    return torch.tensor(shares)


def embed(vectors: Tensor, seed: int = 0, tsne_min_images: int = 20) -> tuple[Tensor, str]:
    """2-D map ``(N, 2)`` in [0, 1] of ``vectors`` ``(N, d)`` and its method (``"tsne"`` or ``"pca"``).

    t-SNE (perplexity ``min(30, (N − 1)/3)``, below ``N`` as scikit-learn requires) from
    ``tsne_min_images`` rows on; PCA below (padded with zeros when the rows span fewer than two
    dimensions). Both axes share one scale, so distances keep their proportions.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = vectors.detach().double().cpu().numpy()
    n = len(x)
    if x.ndim != 2:
        raise ValueError(f"vectors must be (N, d); got shape {tuple(vectors.shape)}")
    if n >= max(tsne_min_images, 4):
        perplexity = min(30.0, max(1.0, (n - 1) / 3))
        # Exact gradients up to a few hundred points: Barnes-Hut's tree costs more than it saves there.
        points = TSNE(2, perplexity=perplexity, init="pca", random_state=seed,
                      method="exact" if n <= 500 else "barnes_hut").fit_transform(x)
        method = "tsne"
    else:
        method = "pca"
        rank = min(n, x.shape[1], 2)
        points = np.zeros((n, 2))
        if rank >= 1 and n >= 2:
            points[:, :rank] = PCA(rank, random_state=seed).fit_transform(x)
    points = points - points.min(0, keepdims=True)
    span = float(points.max()) if n else 0.0
    points = points / span if span > 0 else np.full_like(points, 0.5)
    # Centre the shorter axis in the unit square.
    points = points + (1 - points.max(0, keepdims=True)) / 2
    return torch.from_numpy(points).float(), method


def contribution_maps(craft: Craft, bank: ConceptBank, images: Tensor) -> Tensor:
    """Where each concept drives the class logit: ``(N, k, H, W)`` ≥ 0.

    At each position of the concept layer, concept ``j``'s contribution is its coefficient
    ``u_j`` (:meth:`Craft.transform`) times the directional derivative of the class logit
    (``bank.class_id``) along the concept vector, ``⟨W_j, ∂logit/∂a⟩`` (gradient × input in
    concept space: the first-order change of the logit if the concept vanished there);
    negative contributions count 0. Resized to the image like :meth:`Craft.attribution_maps`
    (bicubic, negatives clipped).
    """
    u = craft.transform(bank, images)  # (N, h, w, k)
    if u.ndim != 4:
        raise ValueError(f"layer {craft.split.name!r} has no 2-D spatial activations; contribution maps need them")
    split = craft.split
    with gradients_on():
        x = images.to(craft.device).clone()
        acts = split.activations(x).detach().requires_grad_(True)
        logits = split.logits(acts, x if split.needs_input else None)
        (grad,) = torch.autograd.grad(logits[:, bank.class_id].sum(), acts)
    along = torch.einsum("kc,nchw->nhwk", bank.components.to(grad), grad)  # ⟨W_j, ∂logit/∂a⟩ per position
    contribution = (u * along.to(u)).clamp_min(0).permute(0, 3, 1, 2)
    maps = F.interpolate(contribution, size=images.shape[-2:], mode="bicubic", align_corners=False)
    return maps.clamp_min(0).detach()


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-by-row cosine ``(len(a), len(b))``; a zero row has cosine 0 with everything."""
    return F.normalize(a.double(), dim=1) @ F.normalize(b.double(), dim=1).T


def network(model: nn.Module) -> nn.Module:
    """The classifier inside an ``AlignedClassifier`` (its ``model``), or ``model`` itself."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(model, "penalties") else model


def saliency_explainer(model: nn.Module) -> tuple[Explainer, str]:
    """The module's training saliency (its penalty's ``saliency``, as ``SaliencyMonitor``'s ``training``), else ``Saliency()``."""
    try:
        return TrainingSaliency().resolve(model), "training"
    except ValueError:
        return Saliency(), "saliency"


# ----- the analysis ---------------------------------------------------------------------------


def analyze_class(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    maps: Tensor | None,
    class_id: int,
    name: str,
    settings: AtlasSettings,
    class_names: list[str],
    donors: tuple[Tensor, Tensor] | None = None,
) -> ClassAnalysis:
    """The analysis of class ``class_id`` from its ``images`` ``(N, C, H, W)`` (see the module doc).

    ``model`` is an ``AlignedClassifier`` (its ``model`` is explained, its penalty gives the
    training saliency) or a plain classifier. ``maps`` ``(N, 1, H, W)`` human maps (all-zero rows:
    no map) or ``None``. ``donors``: ``(images, maps)`` of *other* classes for the background
    swap (:func:`background_swap`; skipped without them). Runs on the model's device; returns
    CPU tensors.
    """
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"class {class_id} ({name}): images must be a non-empty (N, C, H, W) batch; got shape {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise ValueError(f"class {class_id} ({name}): {len(images)} images but labels of shape {tuple(labels.shape)}")
    if maps is not None and (maps.ndim != 4 or maps.shape[0] != len(images) or maps.shape[1] != 1
                             or maps.shape[-2:] != images.shape[-2:]):
        raise ValueError(f"class {class_id} ({name}): human maps must be (N, 1, H, W) = {(len(images), 1, *images.shape[-2:])}; "
                         f"got {tuple(maps.shape)}")
    net = network(model)
    param = next((p for p in net.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else images.device
    images = images.detach().float().cpu()
    labels = labels.detach().long().cpu()
    x = images.to(device)
    # cached_weights: a 1-Lipschitz layer orthonormalizes its weight once for the whole analysis,
    # not at each of its thousands of forwards (the weights do not change here).
    with eval_mode(model), gradients_on(), cached_weights():
        try:
            craft = Craft(net, settings.layer, n_concepts=settings.n_concepts, patch_size=settings.patch_size,
                          nb_design=settings.nb_design, batch_size=settings.batch_size, seed=settings.seed,
                          baseline=settings.baseline)
            bank = craft.fit(x, class_id, importance=False)
        except ValueError as error:
            raise ValueError(f"class {class_id} ({name}): {error}") from None
        per_image = craft.importance(bank, x).float().nan_to_num(0.0).clamp_min(0)  # (N, k)
        order = per_image.mean(0).argsort(descending=True).cpu()
        per_image = per_image[:, order.to(per_image.device)].cpu()
        bank = bank.reorder(order)
        bank.importance = per_image.mean(0)
        sobol = bank.importance.cpu()
        total = float(sobol.sum())
        share = sobol / total if total > 0 else torch.full_like(sobol, 1.0 / len(sobol))
        k = bank.n_concepts
        top = per_image.argmax(1)
        n_top = torch.bincount(top, minlength=k)
        n_important = int((n_top >= settings.important_min_share * len(images)).sum())

        # Presence maps (Craft.attribution_maps): the tints show the first few; every image's only
        # when they, not the contribution maps, weigh the off-map share.
        presence_images = len(x) if settings.off_map_maps == "presence" else min(settings.tint_images, len(x))
        attributions = torch.cat([craft.attribution_maps(bank, x[s : min(s + settings.batch_size, presence_images)]).cpu()
                                  for s in range(0, presence_images, settings.batch_size)] or
                                 [torch.zeros(0, k, *x.shape[-2:])])  # (n, k, H, W)
        has_map = torch.zeros(len(images), dtype=torch.bool) if maps is None else maps.flatten(1).amax(1).cpu() > 0
        maps_cpu = None if maps is None or not has_map.any() else maps.detach().float().cpu()
        off = None
        if maps_cpu is not None:
            weights = attributions
            if settings.off_map_maps == "contribution":
                weights = torch.cat([contribution_maps(craft, bank, x[s : s + settings.batch_size]).cpu()
                                     for s in range(0, len(x), settings.batch_size)])
            off = off_map_share(weights, maps_cpu, settings.map_threshold, has_map)
        flagged = flag_concepts(share, off, settings.flag_importance, settings.flag_off_map)

        pictures = None
        if settings.maco:
            maco = maco_settings("AtlasSettings", {"steps": settings.maco_steps})
            spectrum = Spectrum.from_images(images)  # the class's own images: no file, no download
            pictures = concept_pictures(net, settings.layer, bank, spectrum,
                                        seed=[objective_seed(settings.seed, j) for j in range(k)], **maco).cpu()

        components = bank.components.detach().float().cpu()
        # (k, classes): how much removing each concept lowers every logit, mean over the images
        class_effect = torch.cat([craft.class_effects(bank, x[s : s + settings.batch_size]).cpu()
                                  for s in range(0, len(x), settings.batch_size)]).mean(0)

        with torch.no_grad():
            logits = torch.cat([net(x[s : s + settings.batch_size]).float().cpu() for s in range(0, len(x), settings.batch_size)])
        predicted = logits.argmax(1)
        accuracy = float((predicted == labels).float().mean())

        background = None
        if maps_cpu is not None and donors is not None and settings.background_donors > 0:
            background = background_swap(net, images, maps_cpu, class_id, donors[0].detach().float().cpu(),
                                         donors[1].detach().float().cpu(), settings.map_threshold,
                                         settings.background_donors, settings.flag_background, seed=settings.seed,
                                         examples=settings.saliency_images, batch_size=settings.batch_size,
                                         concepts=lambda x0, xs: background_concepts(craft, bank, class_id, x0.to(device),
                                                                                     xs.to(device)),
                                         predicted=predicted)

        explainer, _ = saliency_explainer(model)
        saliency = explainer.attribute(net, x, labels.to(device)).detach().float().cpu()  # (N, 1, H, W)
        alignment = None
        if maps_cpu is not None:
            alignment = torch.full((len(images),), float("nan"))
            alignment[has_map] = human_alignment(saliency[has_map], maps_cpu[has_map]).float().cpu()

        certified = None
        try:
            certificate = model_certificate(net)
        except ValueError:
            certificate = None
        if certificate is not None:
            radii = certified_radius(logits, certificate).clamp_min(0)
            radii = torch.where(predicted == labels, radii, torch.zeros_like(radii))
            certified_accuracy: list[float] = []
            if settings.epsilons:
                metric = CertifiedAccuracy(settings.epsilons, certificate)
                metric.update(logits, labels)
                certified_accuracy = [float(v) for v in metric.compute()]
            certified = {"epsilons": list(settings.epsilons), "accuracy": certified_accuracy, "radii": radii}

    embedding, method = embed(per_image, settings.seed, settings.tsne_min_images)
    return ClassAnalysis(
        class_id=int(class_id), name=str(name), class_names=[str(c) for c in class_names], settings=settings.as_dict(),
        images=images, labels=labels, maps=maps_cpu, has_map=has_map, predicted=predicted, accuracy=accuracy,
        components=components, profile=bank.coefficients.detach().float().T.cpu().contiguous(),
        sobol=sobol, importance=share, per_image=per_image, top_concept=top, n_top_images=n_top, n_important=n_important,
        reconstruction_error=float(bank.reconstruction_error), top_crops=bank.top_crops(settings.top_crops).float().cpu(),
        pictures=pictures, tint_maps=attributions[: settings.tint_images].clone(), class_effect=class_effect,
        off_map=off, flagged=flagged, proximity=_cosine(components, components).float(),
        embedding=embedding, embedding_method=method, saliency=saliency[: settings.saliency_images].clone(),
        alignment=alignment, certified=certified, background=background,
    )


# ----- the CLASS document and its PNGs --------------------------------------------------------


def _hex(j: int) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in concept_color(j))


def _visible(picture: Tensor, side: int = PICTURE_SIDE) -> Tensor:
    """``(C, H, W)`` → ``(3, s·H, s·W)`` in [0, 1], nearest-upscaled by the integer ``s`` reaching ``side``."""
    picture = picture.detach().float().cpu()
    if picture.shape[0] == 1:
        picture = picture.expand(3, -1, -1)
    elif picture.shape[0] != 3:
        picture = picture[:3]
    scale = max(1, math.ceil(side / max(picture.shape[-2:])))
    if scale > 1:
        picture = F.interpolate(picture[None], scale_factor=scale, mode="nearest")[0]
    return picture.clamp(0, 1)


def _heat(values: Tensor) -> Tensor:
    """``(1, H, W)`` ≥ 0 → ``(3, H, W)`` in matplotlib's ``inferno`` colours, scaled by its maximum."""
    from matplotlib import colormaps

    v = values.detach().float().cpu()[0].abs()
    v = v / v.max().clamp_min(1e-12)
    rgb = colormaps["inferno"](v.numpy())[..., :3]
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()


def _write(picture: Tensor, out: Path, relative: str) -> str:
    save_figure(picture, out / relative)
    return relative


def _concept_documents(a: ClassAnalysis, out: Path, image_dir: str) -> list[dict[str, Any]]:
    """Write every concept's PNGs under ``out/image_dir`` and return the concepts' documents."""
    image_dir = image_dir.strip("/")
    names = a.class_names
    top_n = int(a.settings.get("top_classes", 5))
    shown = a.tint_maps.shape[0]
    concepts = []
    for j in range(a.n_concepts):
        picture = None
        if a.pictures is not None:
            picture = _write(_visible(a.pictures[j]), out, f"{image_dir}/concept_{j}_maco.png")
        crops = [_write(_visible(crop), out, f"{image_dir}/concept_{j}_crop_{i}.png") for i, crop in enumerate(a.top_crops[j])]
        tint = []
        if shown:
            # One overlay row per image, [image | tinted]; pad 0 so the tinted tile is the right half.
            grid = attribution_overlay(a.images[:shown], a.tint_maps[:, j : j + 1], colors=[j], cell=PICTURE_SIDE, pad=0)
            side = grid.shape[1] // shown
            for i in range(shown):
                tile = grid[:, i * side : (i + 1) * side, side : 2 * side]
                tint.append(_write(tile, out, f"{image_dir}/concept_{j}_tint_{i}.png"))
        effect = a.class_effect[j]
        best = [c for c in effect.argsort(descending=True)[:top_n].tolist() if effect[c] > 0]
        off = None if a.off_map is None else float(a.off_map[j])
        concepts.append({
            "id": j, "importance": float(a.importance[j]), "sobol": float(a.sobol[j]), "off_map_share": off,
            "flagged": bool(a.flagged[j]), "color": _hex(j), "picture": picture, "crops": crops, "tint": tint,
            "n_top_images": int(a.n_top_images[j]),
            "classes": [{"id": int(c), "name": names[c] if c < len(names) else str(c), "effect": float(effect[c])} for c in best],
        })
    return concepts


def _background_document(a: ClassAnalysis, out: Path, image_dir: str) -> dict[str, Any] | None:
    """The CLASS document's ``background`` (:func:`background_swap`), its example PNGs written under ``out/image_dir``."""
    b = a.background
    if b is None:
        return None

    def name(c: int) -> str:
        return a.class_names[c] if c < len(a.class_names) else str(c)

    document = {key: b[key] for key in ("images", "donors", "accuracy", "swapped_accuracy", "drop", "drop_interval", "flagged")}
    document["threshold"] = float(a.settings.get("flag_background", 0.1))
    share = b.get("concept_share")
    document["concept_share"] = share
    carrier = None
    if share and b["flagged"]:
        top = max(range(len(share)), key=lambda j: share[j])
        carrier = top if share[top] >= float(a.settings.get("background_carrier", 0.25)) else None
    document["carrier"] = carrier
    document["examples"] = [
        {"image": _write(_visible(b["originals"][i]), out, f"{image_dir}/background_original_{i}.png"),
         "swapped": _write(_visible(b["examples"][i]), out, f"{image_dir}/background_swapped_{i}.png"),
         "original_predicted": name(b["example_original"][i]), "predicted": name(b["example_predicted"][i])}
        for i in range(len(b["examples"]))]
    return document


def class_document(a: ClassAnalysis, out: Path, image_dir: str) -> dict[str, Any]:
    """Write the class's PNGs under ``out/image_dir`` (e.g. ``img/class/3``) and return its CLASS document.

    ``compare`` and ``timeline`` are ``None`` (:func:`compare_section`, :func:`timeline_section`
    fill them). The document is validated before it is returned.
    """
    out = Path(out)
    image_dir = image_dir.strip("/")
    concepts = _concept_documents(a, out, image_dir)
    image_paths = [_write(_visible(img), out, f"{image_dir}/image_{i}.png") for i, img in enumerate(a.images)]
    correct = (a.predicted == a.labels).tolist()
    points = [{"x": float(p[0]), "y": float(p[1]), "concept": int(c), "image": image_paths[i], "correct": bool(correct[i])}
              for i, (p, c) in enumerate(zip(a.embedding, a.top_concept))]
    saliency = []
    for i in range(len(a.saliency)):
        human = None
        if a.maps is not None and bool(a.has_map[i]):
            human = _write(_visible(a.maps[i] / a.maps[i].max().clamp_min(1e-12)), out, f"{image_dir}/human_{i}.png")
        score = None if a.alignment is None or math.isnan(float(a.alignment[i])) else float(a.alignment[i])
        saliency.append({"image": image_paths[i], "human": human,
                         "saliency": _write(_visible(_heat(a.saliency[i])), out, f"{image_dir}/saliency_{i}.png"),
                         "alignment": score, "predicted": int(a.predicted[i])})
    certified = None
    if a.certified is not None:
        radii = a.certified["radii"].double().numpy()
        top = max(float(radii.max()) if len(radii) else 0.0, max(a.certified["epsilons"], default=0.0), 1e-6)
        counts, edges = np.histogram(radii, bins=10, range=(0.0, top))
        certified = {"epsilons": [float(e) for e in a.certified["epsilons"]],
                     "accuracy": [float(v) for v in a.certified["accuracy"]],
                     "radii": [float(r) for r in radii],
                     "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}}
    document = {
        "schema": SCHEMA_VERSION, "kind": "class", "class": {"id": a.class_id, "name": a.name},
        "n_images": len(a.images), "accuracy": a.accuracy, "alignment": a.mean_alignment, "n_important": a.n_important,
        "concepts": concepts, "proximity": a.proximity.tolist(),
        "map": {"method": a.embedding_method, "points": points},
        "saliency": saliency, "certified": certified, "background": _background_document(a, out, image_dir),
        "flags": [j for j in range(a.n_concepts) if bool(a.flagged[j])],
        "compare": None, "timeline": None,
    }
    validate(document, f"class {a.class_id} ({a.name}) document")
    return document


# ----- matching: compare and timeline ---------------------------------------------------------


def match_pairs(a: ClassAnalysis, b: ClassAnalysis) -> list[dict[str, Any]]:
    """Concepts of ``a`` matched one-to-one to those of ``b`` by their profiles (Hungarian on cosine).

    Each pair: ``a`` and ``b`` concept ids, ``cosine`` of their profiles, ``importance_delta`` and
    ``off_map_delta`` = ``b``'s value − ``a``'s (``None`` where either has no off-map share).
    With different numbers of concepts the extra ones stay unmatched.
    """
    if a.profile.shape[1] != b.profile.shape[1] or a.images.shape != b.images.shape or not torch.equal(a.images, b.images):
        raise ValueError(
            f"class {a.class_id}: concepts can only be matched on the same images cut the same way; got profiles over "
            f"{a.profile.shape[1]} and {b.profile.shape[1]} crops of {len(a.images)} and {len(b.images)} images"
            + ("" if a.images.shape != b.images.shape else " (the images differ)")
        )
    k = max(a.n_concepts, b.n_concepts)
    # Zero rows pad the smaller bank (cosine 0 with everything); their pairs are dropped below.
    old = torch.zeros(k, a.profile.shape[1])
    new = torch.zeros(k, b.profile.shape[1])
    old[: a.n_concepts], new[: b.n_concepts] = a.profile, b.profile
    matching = match_concepts(old, new)
    pairs = []
    for i, j in enumerate(matching.order.tolist()):
        if i >= a.n_concepts or j >= b.n_concepts:
            continue
        off = None
        if a.off_map is not None and b.off_map is not None:
            off = float(b.off_map[j] - a.off_map[i])
        pairs.append({"a": i, "b": j, "cosine": float(matching.similarity[i]),
                      "importance_delta": float(b.importance[j] - a.importance[i]), "off_map_delta": off})
    return pairs


def compare_section(a: ClassAnalysis, b: ClassAnalysis, label: str, out: Path, image_dir: str) -> dict[str, Any]:
    """The CLASS document's ``compare``: ``b`` (the other checkpoint's same class) beside ``a``.

    ``b``'s concept PNGs go under ``out/image_dir`` (e.g. ``img/compare/class/3``); pairs as
    :func:`match_pairs` (deltas are the other model's value − this model's).
    """
    if a.class_id != b.class_id:
        raise ValueError(f"compare: class {a.class_id} cannot be compared with class {b.class_id}")
    return {"label": str(label), "accuracy": b.accuracy, "alignment": b.mean_alignment,
            "background": _background_document(b, Path(out), image_dir.strip("/")),
            "concepts": _concept_documents(b, Path(out), image_dir), "pairs": match_pairs(a, b)}


def timeline_section(analyses: list[ClassAnalysis], checkpoints: list[dict[str, Any]]) -> dict[str, Any]:
    """The CLASS document's ``timeline``: one class across checkpoints (oldest first).

    Consecutive checkpoints are matched by :func:`match_pairs`; each concept of the last
    checkpoint is followed back through the matches. A track holds, per checkpoint, the
    matched concept's id (``ids``), importance and the cosine of the match that led to it from
    the previous checkpoint (``None`` at the first, and wherever the track is lost); ``drift``
    is the mean matched cosine of each transition; ``background`` the background swap's accuracy
    drop at each checkpoint (``None`` where it was not measured).
    """
    if len(analyses) != len(checkpoints) or not analyses:
        raise ValueError(f"timeline: {len(analyses)} analyses for {len(checkpoints)} checkpoints (need the same, at least one)")
    for c in checkpoints:
        if not {"label", "epoch", "step"} <= set(c):
            raise ValueError(f"timeline: checkpoint {c!r} needs 'label', 'epoch' and 'step'")
    back: list[dict[int, tuple[int, float]]] = []  # per transition t→t+1: concept at t+1 → (concept at t, cosine)
    drift: list[float | None] = []
    for earlier, later in zip(analyses, analyses[1:]):
        pairs = match_pairs(earlier, later)
        back.append({p["b"]: (p["a"], p["cosine"]) for p in pairs})
        drift.append(float(np.mean([p["cosine"] for p in pairs])) if pairs else None)
    n = len(analyses)
    tracks = []
    for concept in range(analyses[-1].n_concepts):
        ids: list[int | None] = [None] * n
        importance: list[float | None] = [None] * n
        cosine: list[float | None] = [None] * n
        current: int | None = concept
        for t in range(n - 1, -1, -1):
            if current is None:
                break
            ids[t], importance[t] = current, float(analyses[t].importance[current])
            if t == 0:
                break
            step = back[t - 1].get(current)
            if step is None:
                current = None
            else:
                current, cosine[t] = step[0], step[1]
        tracks.append({"concept": concept, "ids": ids, "importance": importance, "cosine": cosine})
    background = [None if a.background is None else float(a.background["drop"]) for a in analyses]
    return {"checkpoints": [{"label": str(c["label"]), "epoch": c["epoch"], "step": c["step"]} for c in checkpoints],
            "tracks": tracks, "drift": drift, "background": background}
