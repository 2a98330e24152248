"""The atlas's static site: the JSON documents of an atlas folder rendered to HTML with Jinja2.

:func:`render_site` reads ``data/atlas.json`` and ``data/class/*.json``, checks each against
:mod:`harmonia.atlas.schema` (and that every image it names exists) before writing anything, then
writes ``index.html``, ``class/<id>.html``, ``timeline.html`` (with a timeline) and copies the
package's ``static/`` files. Charts are small SVGs drawn here, inline in the pages, so the site
needs no chart library, no network and no server: it opens from ``file://``.
:func:`check_links` checks that every ``href``/``src`` of every page resolves to a file of the folder.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import jinja2
from markupsafe import Markup, escape

from harmonia.atlas.schema import validate

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATES = PACKAGE_DIR / "templates"
STATIC = PACKAGE_DIR / "static"

# --------------------------------------------------------------------------------------------- formatting


def fmt_pct(value: float | None, digits: int = 1) -> str:
    """``0.1234`` → ``"12.3%"``; ``None`` → an em dash (a value the atlas could not compute)."""
    if value is None:
        return "—"
    text = f"{100 * value:.{digits}f}"
    return f"{text.lstrip('-') if float(text) == 0 else text}%"  # a tiny negative is 0%, not -0%


def fmt_num(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (integers as they are); ``None`` → an em dash."""
    if value is None:
        return "—"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def fmt_delta(value: float | None, percent: bool = True) -> str:
    """A signed difference (``+3.1%``), em dash for ``None``."""
    if value is None:
        return "—"
    return f"{100 * value:+.1f}%" if percent else f"{value:+.3g}"


def fmt_value(value: Any) -> str:
    """A setting or argument as written in a config: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


# --------------------------------------------------------------------------------------------- SVG charts
# Each function returns a complete inline <svg> as Markup; every piece of text goes through escape().
# Inline SVG in HTML needs no xmlns, which keeps the pages free of any http:// string.


def _attrs(**attributes: Any) -> str:
    parts = []
    for key, value in attributes.items():
        if value is None:
            continue
        parts.append(f'{key.rstrip("_").replace("_", "-")}="{escape(str(value))}"')
    return " ".join(parts)


def _svg(width: float, height: float, body: list[str], label: str, css: str = "chart") -> Markup:
    box = _attrs(class_=css, viewBox=f"0 0 {width:g} {height:g}", width=f"{width:g}", height=f"{height:g}", role="img")
    head = f"<svg {box}>"
    return Markup(head + f"<title>{escape(label)}</title>" + "".join(body) + "</svg>")


def _text(x: float, y: float, text: str, **attributes: Any) -> str:
    return f'<text {_attrs(x=f"{x:.1f}", y=f"{y:.1f}", **attributes)}>{escape(text)}</text>'


def _mix(a: str, b: str, t: float) -> str:
    """The colour ``t`` of the way from ``a`` to ``b`` (``#rrggbb``)."""
    t = min(max(t, 0.0), 1.0)
    ca = [int(a[i:i + 2], 16) for i in (1, 3, 5)]
    cb = [int(b[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb))


def bar_chart(bars: list[dict[str, Any]], label: str, width: int = 520) -> Markup:
    """Horizontal bars, one row per item: ``{"label", "value" (0–1), "color", "flagged", "href"}``.

    Flagged rows get a red outline and a flag mark, so the shortcut stands out in the ranking.
    """
    row, left, right = 22, 70, 120
    height = row * len(bars) + 8
    top = max([b["value"] for b in bars] + [1e-9])
    span = width - left - right
    body = []
    for i, bar in enumerate(bars):
        y = 4 + i * row
        length = max(span * bar["value"] / top, 1.0)
        shape = _attrs(x=left, y=y + 3, width=f"{length:.1f}", height=row - 6, fill=bar["color"],
                       class_="bar-flagged" if bar.get("flagged") else None)
        rect = (f"<rect {shape}>"
                f'<title>{escape(bar["label"])}: {escape(fmt_pct(bar["value"]))}</title></rect>')
        name = _text(left - 6, y + row / 2 + 4, bar["label"], text_anchor="end")
        value = fmt_pct(bar["value"]) + ("  ⚑ off-map" if bar.get("flagged") else "")
        value_text = _text(left + length + 6, y + row / 2 + 4, value, class_="flag-text" if bar.get("flagged") else None)
        item = rect + name + value_text
        if bar.get("href"):
            item = f'<a {_attrs(href=bar["href"])}>{item}</a>'
        body.append(item)
    return _svg(width, height, body, label)


def _nice_range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def line_chart(series: list[dict[str, Any]], label: str, width: int = 320, height: int = 150,
               x_labels: list[str] | None = None, y_range: tuple[float, float] | None = None) -> Markup:
    """Lines of ``{"name", "color", "points": [(x, y | None), ...]}``; a ``None`` y breaks the line.

    ``x_labels`` (one per x = 0, 1, ...) label a categorical axis (checkpoints); without them the
    first and last x are written (steps).
    """
    left, right, top, bottom = 46, 10, 10, 24
    xs = [p[0] for s in series for p in s["points"]]
    ys = [p[1] for s in series for p in s["points"] if p[1] is not None and math.isfinite(p[1])]
    if not xs or not ys:
        return _svg(width, 40, [_text(8, 24, "no values")], label)
    x0, x1 = _nice_range([float(x) for x in xs])
    y0, y1 = y_range if y_range is not None else _nice_range(ys)
    sx = lambda x: left + (float(x) - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda y: top + (1 - (float(y) - y0) / (y1 - y0)) * (height - top - bottom)  # noqa: E731
    body = [f'<line {_attrs(x1=left, y1=height - bottom, x2=width - right, y2=height - bottom, class_="axis")}/>',
            f'<line {_attrs(x1=left, y1=top, x2=left, y2=height - bottom, class_="axis")}/>',
            _text(left - 4, top + 8, fmt_num(y1), text_anchor="end", class_="tick"),
            _text(left - 4, height - bottom, fmt_num(y0), text_anchor="end", class_="tick")]
    if x_labels:
        n, shown = len(x_labels), min(len(x_labels), 6)  # evenly spaced, first and last: no overlap on a long run
        for i in sorted({round(j * (n - 1) / max(shown - 1, 1)) for j in range(shown)}):
            body.append(_text(sx(i), height - 8, x_labels[i], text_anchor="middle", class_="tick"))
    else:
        body.append(_text(left, height - 8, fmt_num(x0), text_anchor="start", class_="tick"))
        body.append(_text(width - right, height - 8, fmt_num(x1), text_anchor="end", class_="tick"))
    for s in series:
        segment: list[str] = []
        segments = [segment]
        for x, y in s["points"]:
            if y is None or not math.isfinite(y):
                segment = []
                segments.append(segment)
                continue
            segment.append(f"{sx(x):.1f},{sy(y):.1f}")
        for seg in segments:
            if len(seg) > 1:
                body.append(f'<polyline {_attrs(points=" ".join(seg), fill="none", stroke=s["color"], stroke_width=2)}/>')
        if len(s["points"]) <= 40:  # dots (with a tooltip) only where they stay readable
            for x, y in s["points"]:
                if y is not None and math.isfinite(y):
                    body.append(f'<circle {_attrs(cx=f"{sx(x):.1f}", cy=f"{sy(y):.1f}", r=2.5, fill=s["color"])}>'
                                f'<title>{escape(s["name"])}: {escape(fmt_num(y))} at {escape(fmt_num(x))}</title></circle>')
    return _svg(width, height, body, label)


def heatmap(matrix: list[list[float]], labels: list[str], colors: list[str], label: str, cell: int = 34) -> Markup:
    """A k×k grid of cosines: blue for positive, red for negative, the value in each cell."""
    k = len(matrix)
    margin = 34
    size = margin + cell * k + 4
    body = []
    for i, name in enumerate(labels):
        body.append(_text(margin - 4, margin + i * cell + cell / 2 + 4, name, text_anchor="end", fill=colors[i]))
        body.append(_text(margin + i * cell + cell / 2, margin - 8, name, text_anchor="middle", fill=colors[i]))
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            fill = _mix("#ffffff", "#2b6cb0", value) if value >= 0 else _mix("#ffffff", "#c53030", -value)
            x, y = margin + j * cell, margin + i * cell
            body.append(f'<rect {_attrs(x=x, y=y, width=cell - 1, height=cell - 1, fill=fill)}>'
                        f'<title>{escape(labels[i])} · {escape(labels[j])}: cosine {value:.2f}</title></rect>')
            body.append(_text(x + cell / 2, y + cell / 2 + 4, f"{value:.2f}", text_anchor="middle",
                              class_="cell-dark" if abs(value) > 0.6 else "cell"))
    return _svg(size, size, body, label, css="chart heatmap")


def scatter(points: list[dict[str, Any]], colors: list[str], names: list[str], root: str, label: str,
            width: int = 420, height: int = 320) -> Markup:
    """The 2-D map: one dot per image coloured by its top concept; a hollow dot is a misclassified image.

    Each dot carries its image in ``data-src`` (for the hover tooltip) and a <title> (without JS).
    """
    pad = 12
    if not points:
        return _svg(width, 40, [_text(8, 24, "no images")], label)
    x0, x1 = _nice_range([p["x"] for p in points])
    y0, y1 = _nice_range([p["y"] for p in points])
    body = [f'<rect {_attrs(x=0, y=0, width=width, height=height, class_="map-frame")}/>']
    for i, p in enumerate(points):
        cx = pad + (p["x"] - x0) / (x1 - x0) * (width - 2 * pad)
        cy = pad + (1 - (p["y"] - y0) / (y1 - y0)) * (height - 2 * pad)
        color = colors[p["concept"]] if 0 <= p["concept"] < len(colors) else "#888888"
        concept = names[p["concept"]] if 0 <= p["concept"] < len(names) else f"concept {p['concept']}"
        tip = f"image {i}: top concept {concept}" + ("" if p["correct"] else " (misclassified)")
        dot = _attrs(class_="map-point", cx=f"{cx:.1f}", cy=f"{cy:.1f}", r=5, tabindex=0,
                     fill=color if p["correct"] else "#ffffff", stroke=color, stroke_width=2,
                     data_src=root + p["image"], data_tip=tip)
        body.append(f"<circle {dot}><title>{escape(tip)}</title></circle>")
    return _svg(width, height, body, label, css="chart map")


def histogram(edges: list[float], counts: list[int], label: str, width: int = 360, height: int = 150) -> Markup:
    """Bars between consecutive ``edges`` with heights ``counts`` (the certified radii)."""
    left, right, top, bottom = 36, 10, 10, 24
    if not counts or len(edges) != len(counts) + 1:
        return _svg(width, 40, [_text(8, 24, "no histogram")], label)
    peak = max(max(counts), 1)
    span = width - left - right
    step = span / len(counts)
    body = [f'<line {_attrs(x1=left, y1=height - bottom, x2=width - right, y2=height - bottom, class_="axis")}/>',
            _text(left - 4, top + 8, str(peak), text_anchor="end", class_="tick"),
            _text(left - 4, height - bottom, "0", text_anchor="end", class_="tick")]
    every = max(1, math.ceil(len(edges) / 8))  # at most ~8 edge labels, always the last one
    for i, edge in enumerate(edges):
        if i % every == 0 or i == len(edges) - 1:
            body.append(_text(left + i * step, height - 8, f"{edge:.2g}", text_anchor="middle", class_="tick"))
    for i, count in enumerate(counts):
        h = (height - top - bottom) * count / peak
        shape = _attrs(x=f"{left + i * step + 1:.1f}", y=f"{height - bottom - h:.1f}", width=f"{max(step - 2, 1):.1f}",
                       height=f"{h:.1f}", class_="hist-bar")
        body.append(f"<rect {shape}>"
                    f'<title>radius {escape(fmt_num(edges[i]))}–{escape(fmt_num(edges[i + 1]))}: {count} images</title></rect>')
    return _svg(width, height, body, label)


# --------------------------------------------------------------------------------------------- loading

_IMAGE_KEYS = ("picture", "image", "human", "saliency")


def _image_paths(node: Any) -> list[str]:
    """Every image path a document names (the keys above, plus the crop and tint lists)."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _IMAGE_KEYS and isinstance(value, str):
                found.append(value)
            elif key in ("crops", "tint") and isinstance(value, list):
                found.extend(v for v in value if isinstance(v, str))
            else:
                found.extend(_image_paths(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_image_paths(item))
    return found


def _read(path: Path, out: Path) -> dict[str, Any]:
    source = str(path.relative_to(out))
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{source}: cannot read the atlas document: {error}") from None
    validate(document, source)
    missing = [p for p in _image_paths(document) if not (out / p).is_file()]
    if missing:
        raise ValueError(f"{source}: {len(missing)} image(s) named by the document are not in {out}: "
                         + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    return document


def load_atlas(out: Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """The INDEX document and the CLASS documents by id, every one validated (``ValueError`` naming the file)."""
    out = Path(out)
    index_path = out / "data" / "atlas.json"
    if not index_path.is_file():
        raise ValueError(f"{index_path}: no INDEX document (is {out} an atlas folder?)")
    index = _read(index_path, out)
    documents: dict[int, dict[str, Any]] = {}
    for path in sorted((out / "data" / "class").glob("*.json")):
        document = _read(path, out)
        if path.stem != str(document["class"]["id"]):
            raise ValueError(f"{path.relative_to(out)}: holds class {document['class']['id']}, "
                             f"expected class {path.stem} (file name)")
        documents[document["class"]["id"]] = document
    for entry in index["classes"]:
        if entry["id"] not in documents:
            raise ValueError(f"data/atlas.json: class {entry['id']} ({entry['name']}) has no data/class/{entry['id']}.json")
        if entry["page"] != f"class/{entry['id']}.html":
            raise ValueError(f"data/atlas.json: class {entry['id']}: page must be 'class/{entry['id']}.html', "
                             f"got {entry['page']!r}")
    if index["timeline"] is not None and index["timeline"]["page"] != "timeline.html":
        raise ValueError(f"data/atlas.json: timeline/page must be 'timeline.html', got {index['timeline']['page']!r}")
    return index, documents


# --------------------------------------------------------------------------------------------- page models


def _concept_name(concept: dict[str, Any]) -> str:
    return f"c{concept['id']}"


def _class_page_model(doc: dict[str, Any], known: dict[int, str], neighbours: tuple[Any, Any]) -> dict[str, Any]:
    """What the class template draws, computed here so the template only lays it out."""
    root = "../"
    concepts = sorted(doc["concepts"], key=lambda c: (-c["importance"], c["id"]))
    by_id = {c["id"]: c for c in doc["concepts"]}
    k = len(doc["concepts"])
    ordered_ids = sorted(by_id)  # proximity rows follow the concept ids (ranks)
    colors = [by_id[i]["color"] for i in ordered_ids]
    names = [f"c{i}" for i in ordered_ids]
    bars = [{"label": _concept_name(c), "value": c["importance"], "color": c["color"], "flagged": c["flagged"],
             "href": f"#concept-{c['id']}"} for c in concepts]
    charts: dict[str, Markup | None] = {
        "importance": bar_chart(bars, f"importance of the concepts of {doc['class']['name']}") if concepts else None,
        "proximity": (heatmap(doc["proximity"], names, colors, "cosine between concepts")
                      if k and len(doc["proximity"]) == k else None),
        "map": scatter(doc["map"]["points"], colors, names, root, f"{doc['map']['method']} map of the class's images"),
        "certified": None, "timeline": None, "drift": None,
    }
    if doc["certified"] is not None:
        hist = doc["certified"]["histogram"]
        charts["certified"] = histogram(hist["edges"], hist["counts"], "certified radius per image")
    timeline = doc["timeline"]
    if timeline is not None:
        charts["timeline"] = timeline_chart(doc, width=560, height=200)
        drift = [{"name": "drift", "color": "#555555", "points": [(i, d) for i, d in enumerate(timeline["drift"])]}]
        labels = [f"{a['label']}→{b['label']}" for a, b in zip(timeline["checkpoints"], timeline["checkpoints"][1:])]
        charts["drift"] = line_chart(drift, "mean matched cosine per transition", width=560, height=140,
                                     x_labels=labels, y_range=(0.0, 1.0)) if timeline["drift"] else None
    compare = None
    if doc["compare"] is not None:
        other = {c["id"]: c for c in doc["compare"]["concepts"]}
        pairs = [{**p, "a": by_id.get(p["a"]), "b": other.get(p["b"])} for p in doc["compare"]["pairs"]]
        pairs = [p for p in pairs if p["a"] is not None and p["b"] is not None]
        matched_b = {p["b"] for p in doc["compare"]["pairs"]}
        compare = {**doc["compare"], "pairs": pairs,
                   "unmatched": [c for c in doc["compare"]["concepts"] if c["id"] not in matched_b]}
    return {"doc": doc, "concepts": concepts, "charts": charts, "known": known, "compare": compare,
            "prev": neighbours[0], "next": neighbours[1], "k": k,
            "legend": [{"name": n, "color": c} for n, c in zip(names, colors)]}


def timeline_chart(doc: dict[str, Any], width: int = 320, height: int = 150) -> Markup:
    """Each track's importance across the checkpoints (one line per concept of the last checkpoint)."""
    timeline = doc["timeline"]
    colors = {c["id"]: c["color"] for c in doc["concepts"]}
    series = [{"name": f"c{t['concept']}", "color": colors.get(t["concept"], "#888888"),
               "points": list(enumerate(t["importance"]))} for t in timeline["tracks"]]
    labels = [c["label"] for c in timeline["checkpoints"]]
    return line_chart(series, f"importance of {doc['class']['name']}'s concepts across checkpoints",
                      width=width, height=height, x_labels=labels)


_PALETTE = ["#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#2c7a7b", "#975a16", "#4a5568"]


_OPEN_GROUPS = ("train", "val", "test")  # shown unfolded; a diagnostics group (saliency/, concepts/...) folds


def _curves(curves: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The curves as groups by their first path part (``train/acc`` → ``train``), each a list of charts."""
    if curves is None:
        return []
    groups: dict[str, list[dict[str, Any]]] = {}
    for i, (name, points) in enumerate(sorted(curves["series"].items())):
        series = [{"name": name, "color": _PALETTE[i % len(_PALETTE)], "points": [(p[0], p[1]) for p in points]}]
        groups.setdefault(name.split("/", 1)[0] if "/" in name else "other", []).append(
            {"name": name, "svg": line_chart(series, f"{name} over training steps"), "last": points[-1][1] if points else None})
    order = sorted(groups, key=lambda g: (_OPEN_GROUPS.index(g) if g in _OPEN_GROUPS else len(_OPEN_GROUPS), g))
    return [{"name": g, "open": g in _OPEN_GROUPS, "charts": groups[g]} for g in order]


# --------------------------------------------------------------------------------------------- rendering


def environment() -> jinja2.Environment:
    """The Jinja2 environment of the site's templates (autoescaped, undefined names are errors)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=fmt_pct, num=fmt_num, delta=fmt_delta, value=fmt_value)
    return env


def render_site(out: Path) -> list[Path]:
    """Render the atlas folder ``out`` (its ``data/`` documents) to HTML; returns the files written.

    Every document is validated (and every image it names checked) before anything is written, so a
    broken document leaves the folder as it was and raises ``ValueError`` naming the file.
    """
    out = Path(out)
    index, documents = load_atlas(out)
    env = environment()
    entries = index["classes"]
    known = {e["id"]: e["name"] for e in entries}
    site = {"title": index["title"], "has_timeline": index["timeline"] is not None,
            "classes": [{"id": e["id"], "name": e["name"], "page": e["page"]} for e in entries]}
    written: list[Path] = []

    def write(relative: str, template: str, **context: Any) -> None:
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        root = "../" * relative.count("/")
        path.write_text(env.get_template(template).render(site=site, root=root, **context))
        written.append(path)

    flags = sorted(index["flags"], key=lambda f: (-f["importance"], f["class"], f["concept"]))
    pictures = {(d["class"]["id"], c["id"]): c["picture"] or (c["crops"][0] if c["crops"] else None)
                for d in documents.values() for c in d["concepts"]}
    flags = [{**f, "picture": pictures.get((f["class"], f["concept"]))} for f in flags]  # shown beside each flag
    write("index.html", "index.html", index=index, flags=flags, known=known, curves=_curves(index["curves"]),
          settings=sorted(index["settings"].items()))
    for i, entry in enumerate(entries):
        neighbours = (entries[i - 1] if i > 0 else None, entries[i + 1] if i + 1 < len(entries) else None)
        page = _class_page_model(documents[entry["id"]], known, neighbours)
        write(entry["page"], "class.html", entry=entry, **page)
    wanted = {out / e["page"] for e in entries}
    for stale in (out / "class").glob("*.html"):  # pages of classes a previous render had and this one has not
        if stale not in wanted:
            stale.unlink()
    timeline = out / "timeline.html"
    if index["timeline"] is not None:
        rows = []
        for entry in entries:
            doc = documents[entry["id"]]
            if doc["timeline"] is None:
                rows.append({"entry": entry, "chart": None, "drift": [], "legend": []})
                continue
            legend = [{"name": f"c{c['id']}", "color": c["color"]} for c in sorted(doc["concepts"], key=lambda c: c["id"])]
            rows.append({"entry": entry, "chart": timeline_chart(doc), "drift": doc["timeline"]["drift"],
                         "background": doc["timeline"]["background"], "legend": legend})
        write("timeline.html", "timeline.html", index=index, rows=rows)
    elif timeline.exists():
        timeline.unlink()
    static = out / "static"
    static.mkdir(exist_ok=True)
    for source in sorted(STATIC.iterdir()):
        if source.is_file():
            shutil.copyfile(source, static / source.name)
            written.append(static / source.name)
    return written


# --------------------------------------------------------------------------------------------- link check

_LINK_ATTRIBUTES = {"href", "src", "data-src", "xlink:href", "poster"}


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "id" and value:
                self.ids.add(value)
            if name in _LINK_ATTRIBUTES and value is not None:
                self.links.append(value)
            if name == "srcset" and value:
                self.links.extend(part.strip().split(" ")[0] for part in value.split(",") if part.strip())

    handle_startendtag = handle_starttag


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(errors="replace"))
    return parser


def check_links(out: Path) -> list[str]:
    """Every ``href``/``src`` of every HTML page under ``out`` that does not resolve to a file of ``out``.

    Returns one line per problem (``"class/3.html: ../img/x.png (missing file)"``); a network URL
    (any scheme, or ``//host``) is a problem, as is a ``#fragment`` naming no element of its page.
    """
    out = Path(out).resolve()
    problems: list[str] = []
    parsed: dict[Path, _Links] = {}

    def page(path: Path) -> _Links:
        if path not in parsed:
            parsed[path] = _parse(path)
        return parsed[path]

    for html in sorted(out.rglob("*.html")):
        where = str(html.relative_to(out))
        for link in page(html).links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith("//"):
                problems.append(f"{where}: {link} (not a file of the atlas: network or absolute URL)")
                continue
            if not parts.path:  # '#fragment' within the page
                if parts.fragment and parts.fragment not in page(html).ids:
                    problems.append(f"{where}: {link} (no element with id {parts.fragment!r})")
                continue
            if parts.path.startswith("/"):
                problems.append(f"{where}: {link} (absolute path; the atlas must stay movable)")
                continue
            target = (html.parent / unquote(parts.path)).resolve()
            if out not in target.parents and target != out:
                problems.append(f"{where}: {link} (outside the atlas folder)")
            elif not target.is_file():
                problems.append(f"{where}: {link} (missing file)")
            elif parts.fragment and target.suffix == ".html" and parts.fragment not in page(target).ids:
                problems.append(f"{where}: {link} (no element with id {parts.fragment!r} in {target.name})")
    return problems


_URL = re.compile(rb"https?://")


def network_urls(out: Path) -> list[str]:
    """Files under ``out`` whose bytes hold an http(s) URL (an offline atlas needs none)."""
    out = Path(out)
    return [str(p.relative_to(out)) for p in sorted(out.rglob("*")) if p.is_file() and _URL.search(p.read_bytes())]
