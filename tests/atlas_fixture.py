"""A small, schema-valid atlas folder for the renderer's tests: real PNGs, every optional section present.

``write_atlas(tmp_path)`` writes ``data/atlas.json``, ``data/class/<id>.json`` and the PNGs they name
(drawn with PIL), as the analysis would, so the site can be rendered and opened in a browser without
a model. Three classes; class 0 has a flagged (shortcut) concept that is *not* its most important one,
class 2 has a concept without MACO picture (the page falls back to its top crop), and concepts drive
a class outside the atlas (no page: no link).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from harmonia.atlas.schema import SCHEMA_VERSION, validate

NAMES = ["zero", "one", "two"]
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
IMPORTANCE = [0.42, 0.31, 0.17, 0.10]  # shares of the class's Sobol indices, sum to 1
FLAGGED = {0: [1], 1: [0]}  # class -> concept ranks flagged as off-map shortcuts
N_CROPS, N_TINT, N_POINTS, N_SALIENCY = 5, 3, 12, 3


def _png(out: Path, relative: str, seed: int, size: int = 32, alpha: bool = False) -> str:
    """Draw a small deterministic picture (a blob and a square) at ``out/relative``; returns ``relative``."""
    rng = random.Random(seed)
    mode = "RGBA" if alpha else "RGB"
    image = Image.new(mode, (size, size), (0, 0, 0, 0) if alpha else (255, 255, 255))
    draw = ImageDraw.Draw(image)
    color = tuple(rng.randrange(40, 220) for _ in range(3)) + ((255,) if alpha else ())
    x, y = rng.randrange(2, size // 2), rng.randrange(2, size // 2)
    draw.ellipse([x, y, x + size // 2, y + size // 2], fill=color)
    draw.rectangle([size - 8, size - 8, size - 3, size - 3], fill=(0, 0, 0, 255) if alpha else (0, 0, 0))
    path = out / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return relative


def _concepts(out: Path, image_dir: str, cid: int, seed: int, flagged: list[int], maco: bool) -> list[dict[str, Any]]:
    concepts = []
    others = [(c, NAMES[c]) for c in range(len(NAMES)) if c != cid] + [(7, "seven")]  # 7 has no page
    for j, share in enumerate(IMPORTANCE):
        base = f"{image_dir}/concept_{j}"
        has_picture = maco and not (cid == 2 and j == 3)
        concepts.append({
            "id": j, "importance": share, "sobol": round(share * 0.8, 4),
            "off_map_share": 0.85 if j in flagged else round(0.1 + 0.05 * j, 3),
            "flagged": j in flagged, "color": COLORS[j],
            "picture": _png(out, f"{base}_picture.png", seed + j, size=48, alpha=True) if has_picture else None,
            "crops": [_png(out, f"{base}_crop_{i}.png", seed + 100 * j + i, size=24) for i in range(N_CROPS)],
            "tint": [_png(out, f"{base}_tint_{i}.png", seed + 1000 + 10 * j + i) for i in range(N_TINT)],
            "n_top_images": max(N_POINTS // (j + 1) - 2, 0),
            "classes": [{"id": c, "name": n, "effect": round(0.9 - 0.2 * i - 0.05 * j, 3)} for i, (c, n) in enumerate(others)],
            # the last entry's class (7) has no page: shown as text, not as a link
            "similar": [{"class": c, "concept": (j + i) % len(IMPORTANCE), "cosine": round(0.95 - 0.1 * i, 3)}
                        for i, (c, _) in enumerate(others[:1] + others[-1:])],
        })
    return concepts


def _background(out: Path, image_dir: str, cid: int, drop: float) -> dict[str, Any]:
    """A background-swap section (two examples; the second one's prediction changes when ``drop`` > 0)."""
    examples = [{"image": _png(out, f"{image_dir}/background_original_{i}.png", 1100 * (cid + 1) + i),
                 "swapped": _png(out, f"{image_dir}/background_swapped_{i}.png", 1300 * (cid + 1) + i),
                 "original_predicted": NAMES[cid], "predicted": NAMES[(cid + 1) % len(NAMES)] if drop and i == 1 else NAMES[cid]}
                for i in range(2)]
    return {"images": N_POINTS, "donors": 4, "accuracy": 0.9, "swapped_accuracy": round(0.9 - drop, 3), "drop": drop,
            "drop_interval": [round(drop - 0.05, 3), round(drop + 0.05, 3)],
            "concept_share": [0.1, 0.6, 0.05, 0.0] if drop else [0.0] * 4, "carrier": 1 if drop >= 0.1 else None,
            "flagged": drop >= 0.1, "threshold": 0.1, "examples": examples}


def class_document(out: Path, cid: int, *, compare: bool = True, timeline: bool = True, certified: bool = True,
                   maco: bool = True, background: bool = True) -> dict[str, Any]:
    """The CLASS document of class ``cid`` (its PNGs written under ``out/img``)."""
    k = len(IMPORTANCE)
    image_dir = f"img/class/{cid}"
    flagged = FLAGGED.get(cid, [])
    concepts = _concepts(out, image_dir, cid, 10_000 * (cid + 1), flagged, maco)
    rng = random.Random(cid)
    points = [{"x": rng.uniform(-5, 5), "y": rng.uniform(-5, 5), "concept": i % k,
               "image": _png(out, f"{image_dir}/image_{i}.png", 500 * (cid + 1) + i), "correct": i % 5 != 4}
              for i in range(N_POINTS)]
    saliency = [{"image": points[i]["image"],
                 "human": _png(out, f"{image_dir}/human_{i}.png", 700 * (cid + 1) + i) if i != 2 else None,
                 "saliency": _png(out, f"{image_dir}/saliency_{i}.png", 900 * (cid + 1) + i),
                 "alignment": round(0.7 - 0.1 * i, 3) if i != 2 else None,
                 "predicted": cid if i != 1 else (cid + 1) % len(NAMES)} for i in range(N_SALIENCY)]
    proximity = [[1.0 if i == j else round(0.6 - 0.15 * abs(i - j) - (0.5 if i + j == 3 else 0), 3) for j in range(k)]
                 for i in range(k)]
    document: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "kind": "class", "class": {"id": cid, "name": NAMES[cid]},
        "n_images": N_POINTS, "accuracy": sum(p["correct"] for p in points) / N_POINTS,
        "alignment": round(0.6 - 0.1 * cid, 3), "n_important": 2, "concepts": concepts,
        "proximity": proximity, "map": {"method": "tsne", "points": points}, "saliency": saliency,
        "certified": None, "flags": flagged, "compare": None, "timeline": None,
        "background": _background(out, image_dir, cid, 0.4 if cid == 1 else 0.0) if background else None,
    }
    if certified:
        document["certified"] = {"epsilons": [0.1, 0.25, 0.5], "accuracy": [0.8, 0.55, 0.2],
                                 "radii": [round(0.05 * i, 3) for i in range(N_POINTS)],
                                 "histogram": {"edges": [0.0, 0.15, 0.3, 0.45, 0.6], "counts": [3, 3, 3, 3]}}
    if compare:
        other = _concepts(out, f"img/compare/class/{cid}", cid, 20_000 * (cid + 1), [0] if cid == 2 else [], maco)
        pairs = [{"a": j, "b": (j + 1) % k, "cosine": round(0.9 - 0.1 * j, 3),
                  "importance_delta": round(IMPORTANCE[j] - IMPORTANCE[(j + 1) % k], 3),
                  "off_map_delta": round(concepts[j]["off_map_share"] - other[(j + 1) % k]["off_map_share"], 3)}
                 for j in range(k - 1)]  # the other model's concept 0 stays unmatched
        document["compare"] = {"label": "baseline", "accuracy": 0.75, "alignment": 0.2, "concepts": other, "pairs": pairs,
                               "background": _background(out, f"img/compare/class/{cid}", cid, 0.3 if cid == 2 else 0.0)
                               if background else None}
    if timeline:
        checkpoints = [{"label": f"epoch={e}", "epoch": e, "step": 50 * (e + 1)} for e in range(3)]
        tracks = [{"concept": j, "importance": [None if j == 3 else 0.25, round(0.2 + 0.05 * j, 3), IMPORTANCE[j]],
                   "cosine": [None, 0.7, 0.9]} for j in range(k)]
        document["timeline"] = {"checkpoints": checkpoints, "tracks": tracks, "drift": [0.62, 0.91],
                                "background": [0.35, None, 0.05] if background else [None] * 3}
    validate(document, f"fixture class {cid}")
    return document


def write_atlas(out: Path, *, n_classes: int = 3, compare: bool = True, timeline: bool = True, curves: bool = True,
                certified: bool = True, maco: bool = True, background: bool = True) -> Path:
    """Write a complete atlas folder (documents + PNGs, no HTML) under ``out``; returns ``out``."""
    out = Path(out)
    (out / "data" / "class").mkdir(parents=True, exist_ok=True)
    entries, flags = [], []
    for cid in range(n_classes):
        document = class_document(out, cid, compare=compare, timeline=timeline, certified=certified, maco=maco,
                                  background=background)
        (out / "data" / "class" / f"{cid}.json").write_text(json.dumps(document, indent=1))
        top = document["concepts"][0]
        entries.append({"id": cid, "name": NAMES[cid], "page": f"class/{cid}.html",
                        "picture": top["picture"] or top["crops"][0], "n_concepts": len(document["concepts"]),
                        "n_important": document["n_important"], "accuracy": document["accuracy"],
                        "alignment": document["alignment"], "flagged": document["flags"],
                        "background_drop": document["background"]["drop"] if document["background"] else None})
        flags += [{"class": cid, "concept": c["id"], "importance": c["importance"], "off_map_share": c["off_map_share"]}
                  for c in document["concepts"] if c["flagged"]]
    index: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "kind": "index", "title": "Atlas of the fixture model", "created": "2026-12-06 12:00 UTC",
        "model": {"label": "digits", "arch": "lipschitz_cnn", "arch_args": {"width": 16, "depth": 3},
                  "num_classes": 10, "parameters": 123456, "lipschitz": certified,
                  "checkpoint": "runs/digits/checkpoints/best.ckpt", "epoch": 4, "global_step": 250,
                  "config": "model:\n  arch: lipschitz_cnn  # <b>not bold</b> & escaped\ntrainer:\n  max_epochs: 5\n",
                  "data": "decoy digits (embedded), test split, 12 images per class"},
        "metrics": {"split": "test", "images": 12 * n_classes, "accuracy": 0.83, "alignment": 0.5,
                    "heldout_accuracy": 0.81,
                    "certified": {"epsilons": [0.1, 0.25, 0.5], "accuracy": [0.7, 0.5, 0.2]} if certified else None},
        "settings": {"layer": "features.4", "n_concepts": 4, "images_per_class": 12, "flag_importance": 0.2,
                     "flag_off_map": 0.6, "maco": maco, "seed": 0},
        "classes": entries, "flags": flags,
        "background_flags": [{"class": e["id"], "drop": e["background_drop"], "accuracy": 0.9,
                              "drop_interval": [e["background_drop"] - 0.05, e["background_drop"] + 0.05],
                              "concept": 1, "concept_share": 0.6,
                              "swapped_accuracy": round(0.9 - e["background_drop"], 3)}
                             for e in entries if (e["background_drop"] or 0) >= 0.1],
        "curves": {"source": "runs/digits/csv/metrics.csv",
                   "series": {"train/loss": [[s, 2.3 / (1 + s / 40)] for s in range(0, 260, 10)],
                              "val/acc": [[s, 0.5 + 0.3 * s / 250] for s in range(50, 260, 50)],
                              "val/alignment": [[125, 0.3], [250, 0.5]],
                              "saliency/gradient/alignment": [[100, 0.6], [200, 0.7]]}} if curves else None,
        "compare": {"label": "baseline", "checkpoint": "runs/digits_baseline/checkpoints/best.ckpt", "accuracy": 0.9,
                    "alignment": 0.2, "flags": [{"class": 2, "concept": 0, "importance": 0.42, "off_map_share": 0.85}],
                    "background_flags": [{"class": 2, "drop": 0.3, "drop_interval": [0.2, 0.4], "accuracy": 0.9, "concept": None,
                                          "concept_share": None,
                                          "swapped_accuracy": 0.6}] if background else []}
        if compare else None,
        "timeline": {"page": "timeline.html",
                     "checkpoints": [{"label": f"epoch={e}", "epoch": e, "step": 50 * (e + 1)} for e in range(3)]}
        if timeline else None,
    }
    validate(index, "fixture index")
    (out / "data" / "atlas.json").write_text(json.dumps(index, indent=1))
    return out
