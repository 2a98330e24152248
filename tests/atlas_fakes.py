"""Small stand-ins for ``harmonia.atlas.analysis`` and ``harmonia.atlas.render`` used by the command's tests.

They keep the interface of the real modules and produce schema-valid documents from a real forward
pass of the model, so the tests check the command's wiring (arguments, images, cache, DDP sharding,
compare/timeline, index) without the cost of the real analysis. ``install()`` puts them in
``sys.modules``; ``python -m atlas_fakes atlas ...`` runs the real ``harmonia`` command with them
(also in the processes a DDP run launches, which run this module again). Every call is appended
to the file named by ``ATLAS_FAKE_LOG`` when it is set, as ``<rank> <function> <class>``.
"""

from __future__ import annotations

import json
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from harmonia.atlas.schema import SCHEMA_VERSION

CALLS: list[tuple[str, int]] = []


def _log(function: str, class_id: int) -> None:
    CALLS.append((function, class_id))
    path = os.environ.get("ATLAS_FAKE_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{os.environ.get('LOCAL_RANK', '0')} {function} {class_id}\n")


@dataclass
class AtlasSettings:
    """The analysis knobs the contract names, with small defaults."""

    layer: Any = 9
    n_concepts: int = 3
    images_per_class: int = 4
    patch_size: int = 12
    nb_design: int = 4
    top_crops: int = 2
    tint_images: int = 2
    saliency_images: int = 2
    maco: bool = True
    maco_steps: int = 4
    baseline: float | None = None
    map_threshold: float = 0.5
    flag_importance: float = 0.2
    flag_off_map: float = 0.5
    background_donors: int = 2
    flag_background: float = 0.1
    important_min_share: float = 0.1
    split: str = "train"
    seed: int = 0
    epsilons: list[float] = field(default_factory=lambda: [0.1, 0.25])


@dataclass
class ClassAnalysis:
    """What the fake keeps: the class, its predictions and a profile (CPU tensors)."""

    class_id: int
    name: str
    predicted: Tensor
    labels: Tensor
    has_maps: bool
    profile: Tensor
    n_concepts: int
    lipschitz: bool
    epsilons: list[float]
    weights_sum: float  # tells checkpoints apart in tests
    n_donors: int | None = None  # images the runner handed over for the background swap (None: none)


def analyze_class(model, images, labels, maps, class_id, name, settings, class_names, donors=None) -> ClassAnalysis:  # noqa: ANN001
    """A real forward (and an input gradient, as the real analysis needs) of the class's images."""
    _log("analyze_class", class_id)
    if donors is not None:
        assert len(donors[0]) == len(donors[1]) and donors[0].shape[1:] == images.shape[1:]
        _log("donors", len(donors[0]))
    assert torch.is_grad_enabled(), "the atlas runner must enable gradients"
    x = images.clone().requires_grad_(True)
    logits = model(x)
    logits.gather(1, labels[:, None]).sum().backward()
    assert x.grad is not None
    k = settings.n_concepts
    net = model.model  # the runner hands over the AlignedClassifier (its penalty names the training saliency)
    assert hasattr(model, "penalties")
    return ClassAnalysis(class_id, name, logits.argmax(1).detach().cpu(), labels.cpu(), maps is not None,
                         torch.rand(k, 5), k, getattr(net, "certificate", None) is not None, list(settings.epsilons),
                         float(sum(v.double().sum() for v in net.state_dict().values() if v.is_floating_point())),
                         None if donors is None else len(donors[0]))


def _concepts(a: ClassAnalysis) -> list[dict[str, Any]]:
    shares = [1.0 / a.n_concepts] * a.n_concepts
    return [{"id": j, "importance": shares[j], "sobol": shares[j], "off_map_share": 0.8 if a.has_maps else None,
             "flagged": a.class_id == 0 and j == 0, "color": "#1f77b4", "picture": None, "crops": [], "tint": [],
             "n_top_images": 1, "classes": [{"id": a.class_id, "name": a.name, "effect": 1.0}]} for j in range(a.n_concepts)]


def _background(a: ClassAnalysis) -> dict[str, Any] | None:
    """A background swap section when the class had maps and donors; class 1 is the reliant one."""
    if not a.has_maps or not a.n_donors:
        return None
    drop = 0.5 if a.class_id == 1 else 0.0
    return {"images": len(a.labels), "donors": 2, "accuracy": 1.0, "swapped_accuracy": 1.0 - drop, "drop": drop,
            "drop_interval": [drop - 0.1, drop + 0.1],
            "concept_share": None, "carrier": None,
            "flagged": drop >= 0.1, "threshold": 0.1, "examples": []}


def _accuracy(a: ClassAnalysis) -> float:
    return float((a.predicted == a.labels).float().mean())


def class_document(a: ClassAnalysis, out: Path, image_dir: str) -> dict[str, Any]:
    """A schema-valid CLASS document; writes one file under ``image_dir`` (as the real one writes PNGs)."""
    _log("class_document", a.class_id)
    folder = Path(out) / image_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "written.txt").write_text(str(a.weights_sum))
    n = len(a.labels)
    certified = None
    if a.lipschitz:
        certified = {"epsilons": a.epsilons, "accuracy": [0.5] * len(a.epsilons), "radii": [0.1] * n,
                     "histogram": {"edges": [0.0, 1.0], "counts": [n]}}
    return {"schema": SCHEMA_VERSION, "kind": "class", "class": {"id": a.class_id, "name": a.name}, "n_images": n,
            "accuracy": _accuracy(a), "alignment": 0.5 if a.has_maps else None, "n_important": 1,
            "concepts": _concepts(a), "proximity": [[1.0] * a.n_concepts for _ in range(a.n_concepts)],
            "map": {"method": "pca", "points": []}, "saliency": [], "certified": certified,
            "background": _background(a), "flags": [0] if a.class_id == 0 else [], "compare": None, "timeline": None,
            "weights_sum": a.weights_sum}


def compare_section(a: ClassAnalysis, b: ClassAnalysis, label: str, out: Path, image_dir: str) -> dict[str, Any]:
    """The CLASS document's compare section."""
    _log("compare_section", a.class_id)
    (Path(out) / image_dir).mkdir(parents=True, exist_ok=True)
    return {"label": label, "accuracy": _accuracy(b), "alignment": None, "background": _background(b), "concepts": _concepts(b),
            "pairs": [{"a": j, "b": j, "cosine": 1.0, "importance_delta": 0.0, "off_map_delta": None}
                      for j in range(min(a.n_concepts, b.n_concepts))],
            "weights_sum": b.weights_sum}


def timeline_section(analyses: list[ClassAnalysis], checkpoints: list[dict[str, Any]]) -> dict[str, Any]:
    """The CLASS document's timeline section (one importance per checkpoint)."""
    _log("timeline_section", analyses[-1].class_id)
    assert len(analyses) == len(checkpoints)
    return {"checkpoints": checkpoints,
            "tracks": [{"concept": 0, "importance": [1.0 / x.n_concepts for x in analyses], "cosine": [None] * len(analyses)}],
            "drift": [1.0] * (len(analyses) - 1), "background": [None] * len(analyses), "weights_sums": [x.weights_sum for x in analyses]}


def render_site(out: Path) -> list[Path]:
    """Write index.html (the real renderer writes every page)."""
    _log("render_site", -1)
    index = json.loads((Path(out) / "data" / "atlas.json").read_text())
    page = Path(out) / "index.html"
    page.write_text("<html>" + "".join(f"<a href='{c['page']}'>{c['name']}</a>" for c in index["classes"]) + "</html>")
    return [page]


def network(model: nn.Module) -> nn.Module:
    """As the analysis's: the network inside an ``AlignedClassifier``."""
    return model.model if hasattr(model, "penalties") else model


def install() -> None:
    """Make ``harmonia.atlas.analysis`` and ``harmonia.atlas.render`` these fakes."""
    analysis = types.ModuleType("harmonia.atlas.analysis")
    for name in ("AtlasSettings", "ClassAnalysis", "analyze_class", "class_document", "compare_section", "timeline_section",
                 "network"):
        setattr(analysis, name, globals()[name])
    render = types.ModuleType("harmonia.atlas.render")
    render.render_site = render_site
    sys.modules["harmonia.atlas.analysis"] = analysis
    sys.modules["harmonia.atlas.render"] = render


if __name__ == "__main__":
    install()
    from harmonia.train import main

    main()
