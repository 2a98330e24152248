"""The atlas's data: one JSON document per page, checked against a JSON Schema before rendering.

The analysis (:mod:`harmonia.atlas.analysis`) writes these documents and the PNGs they name; the
renderer (:mod:`harmonia.atlas.render`) turns them into HTML and reads nothing else. Every path
inside a document is relative to the atlas folder (``img/class/3/concept_0_crop_1.png``), so the
folder can be moved or zipped whole.

Layout of an atlas folder::

    index.html                 the model card, the class grid, the flags, the curves
    class/<id>.html            one page per class
    timeline.html              with --timeline: every class's concepts across the run
    data/atlas.json            INDEX document
    data/class/<id>.json       CLASS documents
    img/...                    PNGs named by the documents
    static/                    the site's CSS and JS (nothing is fetched from the network)
    cache/                     analyses reused by a re-run with the same inputs

Concepts are numbered by their rank in the class (0 = most important); ``importance`` is the
concept's share of the summed total Sobol indices of the class (the shares sum to 1).
"""

from __future__ import annotations

from typing import Any

import jsonschema

SCHEMA_VERSION = "harmonia-atlas/2"

_number = {"type": "number"}
_maybe_number = {"type": ["number", "null"]}
_path = {"type": "string", "pattern": r"^(?!/)(?!.*\.\.)[^\\]+$"}  # relative, no '..', no backslash
_maybe_path = {"anyOf": [_path, {"type": "null"}]}
_class_ref = {
    "type": "object",
    "required": ["id", "name"],
    "properties": {"id": {"type": "integer", "minimum": 0}, "name": {"type": "string"}},
}

_concept = {
    "type": "object",
    "required": ["id", "importance", "sobol", "off_map_share", "flagged", "color", "picture", "crops", "tint",
                 "n_top_images", "classes"],
    "properties": {
        "id": {"type": "integer", "minimum": 0},  # rank in its class, 0 = most important
        "importance": {"type": "number", "minimum": 0, "maximum": 1},  # share of the class's total Sobol indices
        "sobol": _number,  # mean total Sobol index (raw)
        "off_map_share": {"type": ["number", "null"], "minimum": 0, "maximum": 1},  # null without human maps
        "flagged": {"type": "boolean"},  # important and mostly off the human maps
        "color": {"type": "string", "pattern": "^#[0-9a-f]{6}$"},
        "picture": _maybe_path,  # MACO picture with transparency; null when MACO is off
        "crops": {"type": "array", "items": _path},  # top-activating crops, best first
        "tint": {"type": "array", "items": _path},  # the concept's attribution tinted on class images
        "n_top_images": {"type": "integer", "minimum": 0},  # images whose top concept this is
        "similar": {  # optional: the most similar concepts of other classes (cosine of concept vectors)
            "type": "array",
            "items": {"type": "object", "required": ["class", "concept", "cosine"],
                      "properties": {"class": {"type": "integer"}, "concept": {"type": "integer"}, "cosine": _number}},
        },
        "classes": {  # classes whose logit the concept raises most (removal effect, > 0), best first
            "type": "array",
            "items": {"type": "object", "required": ["id", "name", "effect"],
                      "properties": {"id": {"type": "integer"}, "name": {"type": "string"}, "effect": _number}},
        },
    },
}

_pair = {  # a matched pair of concepts (compare: a = this model, b = the other; timeline: a = earlier)
    "type": "object",
    "required": ["a", "b", "cosine"],
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}, "cosine": _number,
                   "importance_delta": _maybe_number, "off_map_delta": _maybe_number},
}

_certified = {
    "type": ["object", "null"],
    "required": ["epsilons", "accuracy", "radii", "histogram"],
    "properties": {
        "epsilons": {"type": "array", "items": _number},
        "accuracy": {"type": "array", "items": _number},  # certified accuracy at each epsilon
        "radii": {"type": "array", "items": _number},  # per image (0 when misclassified)
        "histogram": {"type": "object", "required": ["edges", "counts"],
                      "properties": {"edges": {"type": "array", "items": _number},
                                     "counts": {"type": "array", "items": {"type": "integer"}}}},
    },
}

_background: dict[str, Any] = {  # null without human maps or without images of other classes
    "type": ["object", "null"],
    "required": ["images", "donors", "accuracy", "swapped_accuracy", "drop", "drop_interval", "flagged", "threshold",
                 "concept_share", "carrier", "examples"],
    "properties": {
        "images": {"type": "integer", "minimum": 1},  # mapped images of the class
        "donors": {"type": "integer", "minimum": 1},  # other-class backgrounds per image
        "accuracy": _number, "swapped_accuracy": _number,
        "drop": _number,  # accuracy − swapped accuracy
        "drop_interval": {"type": "array", "items": _number, "minItems": 2, "maxItems": 2},  # normal 95%, over images
        "flagged": {"type": "boolean"},  # drop ≥ threshold
        "threshold": _number,
        # per concept (rank order): the share of the swap's logit drop that restoring it brings back
        "concept_share": {"type": ["array", "null"], "items": _number},
        "carrier": {"type": ["integer", "null"]},  # the concept named as carrying a flagged drop
        "examples": {"type": "array", "items": {
            "type": "object", "required": ["image", "swapped", "original_predicted", "predicted"],
            "properties": {"image": _path, "swapped": _path, "original_predicted": {"type": "string"},
                           "predicted": {"type": "string"}}}},
    },
}

CLASS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema", "kind", "class", "n_images", "accuracy", "alignment", "n_important", "concepts",
                 "proximity", "map", "saliency", "certified", "background", "flags", "compare", "timeline"],
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "kind": {"const": "class"},
        "class": _class_ref,
        "n_images": {"type": "integer", "minimum": 1},
        "accuracy": {"type": "number", "minimum": 0, "maximum": 1},  # on the analysed images
        "alignment": _maybe_number,  # mean human alignment of the saliency maps; null without human maps
        "n_important": {"type": "integer", "minimum": 0},  # concepts that are the top concept of enough images
        "concepts": {"type": "array", "items": _concept},
        "proximity": {"type": "array", "items": {"type": "array", "items": _number}},  # k×k cosine of concept vectors
        "map": {  # the class's images placed by their concept-importance vectors
            "type": "object",
            "required": ["method", "points"],
            "properties": {
                "method": {"enum": ["tsne", "pca"]},
                "points": {"type": "array", "items": {
                    "type": "object", "required": ["x", "y", "concept", "image", "correct"],
                    "properties": {"x": _number, "y": _number, "concept": {"type": "integer"}, "image": _path,
                                   "correct": {"type": "boolean"}}}},
            },
        },
        "saliency": {"type": "array", "items": {  # image | human map | saliency, with the alignment score
            "type": "object", "required": ["image", "human", "saliency", "alignment", "predicted"],
            "properties": {"image": _path, "human": _maybe_path, "saliency": _path, "alignment": _maybe_number,
                           "predicted": {"type": "integer"}}}},
        "certified": _certified,  # null unless the model is 1-Lipschitz
        "background": _background,  # the background swap: does the class follow what lies off the human maps?
        "flags": {"type": "array", "items": {"type": "integer"}},  # ids of flagged concepts
        "compare": {  # null unless --compare: the same class of the other checkpoint
            "type": ["object", "null"],
            "required": ["label", "accuracy", "alignment", "background", "concepts", "pairs"],
            "properties": {"label": {"type": "string"}, "accuracy": _number, "alignment": _maybe_number,
                           "background": _background,
                           "concepts": {"type": "array", "items": _concept},
                           "pairs": {"type": "array", "items": _pair}},
        },
        "timeline": {  # null unless --timeline: this class's concepts at every checkpoint of the run
            "type": ["object", "null"],
            "required": ["checkpoints", "tracks", "drift", "background"],
            "properties": {
                "checkpoints": {"type": "array", "items": {
                    "type": "object", "required": ["label", "epoch", "step"],
                    "properties": {"label": {"type": "string"}, "epoch": {"type": ["integer", "null"]},
                                   "step": {"type": ["integer", "null"]}}}},
                # one track per concept of the last checkpoint, followed back by matching
                "tracks": {"type": "array", "items": {
                    "type": "object", "required": ["concept", "importance", "cosine"],
                    "properties": {"concept": {"type": "integer"},
                                   "importance": {"type": "array", "items": _maybe_number},
                                   "cosine": {"type": "array", "items": _maybe_number}}}},
                "drift": {"type": "array", "items": _maybe_number},  # mean matched cosine, per transition
                "background": {"type": "array", "items": _maybe_number},  # background swap drop per checkpoint
            },
        },
    },
}

_background_flag: dict[str, Any] = {
    "type": "object", "required": ["class", "drop", "drop_interval", "accuracy", "swapped_accuracy", "concept", "concept_share"],
    "properties": {"class": {"type": "integer"}, "drop": _number, "accuracy": _number, "swapped_accuracy": _number,
                   "concept": {"type": ["integer", "null"]}, "concept_share": _maybe_number,
                   "drop_interval": {"type": "array", "items": _number, "minItems": 2, "maxItems": 2}},
}

INDEX_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema", "kind", "title", "created", "model", "metrics", "settings", "classes", "flags",
                 "background_flags", "curves", "compare", "timeline"],
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "kind": {"const": "index"},
        "title": {"type": "string"},
        "created": {"type": "string"},
        "model": {
            "type": "object",
            "required": ["label", "arch", "arch_args", "num_classes", "parameters", "lipschitz", "checkpoint", "epoch",
                         "global_step", "config", "data"],
            "properties": {
                "label": {"type": "string"}, "arch": {"type": "string"}, "arch_args": {"type": "object"},
                "num_classes": {"type": "integer"}, "parameters": {"type": "integer"},
                "lipschitz": {"type": "boolean"}, "checkpoint": {"type": "string"},
                "epoch": {"type": ["integer", "null"]}, "global_step": {"type": ["integer", "null"]},
                "config": {"type": ["string", "null"]},  # the run's YAML
                "data": {"type": "string"},  # one line on the data module and the split analysed
            },
        },
        "metrics": {
            "type": "object",
            "required": ["split", "images", "accuracy", "alignment", "certified"],
            "properties": {"split": {"type": "string"}, "images": {"type": "integer"},
                           "accuracy": _number, "alignment": _maybe_number,
                           "heldout_accuracy": _maybe_number,
                           "certified": {"type": ["object", "null"], "required": ["epsilons", "accuracy"]}},
        },
        "settings": {"type": "object"},  # every analysis setting, shown on the index and keyed into the cache
        "classes": {"type": "array", "items": {
            "type": "object",
            "required": ["id", "name", "page", "picture", "n_concepts", "n_important", "accuracy", "alignment", "flagged",
                         "background_drop"],
            "properties": {"id": {"type": "integer"}, "name": {"type": "string"}, "page": _path,
                           "picture": _maybe_path,  # the top concept's MACO picture (its top crop without MACO)
                           "n_concepts": {"type": "integer"}, "n_important": {"type": "integer"},
                           "accuracy": _number, "alignment": _maybe_number,
                           "flagged": {"type": "array", "items": {"type": "integer"}},
                           "background_drop": _maybe_number}}},
        "flags": {"type": "array", "items": {
            "type": "object", "required": ["class", "concept", "importance", "off_map_share"],
            "properties": {"class": {"type": "integer"}, "concept": {"type": "integer"},
                           "importance": _number, "off_map_share": _number}}},
        "background_flags": {"type": "array", "items": _background_flag},  # background-reliant classes
        "curves": {  # null unless the run's logs were found: {name: [[step, value], ...]}
            "type": ["object", "null"],
            "required": ["source", "series"],
            "properties": {"source": {"type": "string"},
                           "series": {"type": "object", "additionalProperties": {
                               "type": "array", "items": {"type": "array", "prefixItems": [_number, _number],
                                                          "minItems": 2, "maxItems": 2}}}},
        },
        "compare": {"type": ["object", "null"],
                    "required": ["label", "checkpoint", "accuracy", "alignment", "flags", "background_flags"],
                    "properties": {"label": {"type": "string"}, "checkpoint": {"type": "string"},
                                   "accuracy": _number, "alignment": _maybe_number,
                                   "flags": {"type": "array"},
                                   "background_flags": {"type": "array", "items": _background_flag}}},
        "timeline": {"type": ["object", "null"], "required": ["page", "checkpoints"],
                     "properties": {"page": _path, "checkpoints": {"type": "array"}}},
    },
}

SCHEMAS = {"index": INDEX_SCHEMA, "class": CLASS_SCHEMA}


def validate(document: dict[str, Any], source: str = "atlas document") -> None:
    """Raise ``ValueError`` naming ``source`` and the failing field when ``document`` breaks its schema."""
    kind = document.get("kind") if isinstance(document, dict) else None
    if kind not in SCHEMAS:
        raise ValueError(f"{source}: 'kind' must be one of {sorted(SCHEMAS)}, got {kind!r}")
    try:
        jsonschema.validate(document, SCHEMAS[kind], cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as error:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ValueError(f"{source}: {where}: {error.message}") from None
