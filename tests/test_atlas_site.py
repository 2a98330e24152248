"""The atlas's static site: rendering, links, images, schema refusals, page content, and a real browser."""

from __future__ import annotations

import json
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from atlas_fixture import IMPORTANCE, NAMES, write_atlas

from harmonia.atlas.browser import chromium_available, check_site
from harmonia.atlas.render import bar_chart, check_links, fmt_pct, heatmap, line_chart, network_urls, render_site
from harmonia.atlas.schema import validate


@pytest.fixture
def atlas(tmp_path: Path) -> Path:
    """A rendered fixture atlas (every optional section present)."""
    out = write_atlas(tmp_path / "atlas")
    render_site(out)
    return out


class _Tags(HTMLParser):
    """Start tags with their attributes, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):  # noqa: D401, ANN001
        self.tags.append((tag, dict(attrs)))


def _tags(path: Path) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(path.read_text())
    return parser.tags


def test_render_writes_every_page_and_links_resolve(tmp_path: Path) -> None:
    out = write_atlas(tmp_path / "atlas")
    written = render_site(out)
    relative = sorted(str(p.relative_to(out)) for p in written)
    assert relative == sorted(["index.html", "timeline.html", "static/atlas.css", "static/atlas.js"]
                              + [f"class/{i}.html" for i in range(len(NAMES))])
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert check_links(out) == []
    index = (out / "index.html").read_text()
    for i in range(len(NAMES)):  # the grid links every class page, and the timeline is linked
        assert f'href="class/{i}.html"' in index
    assert 'href="timeline.html"' in index


def test_every_image_exists_and_has_alt_text(atlas: Path) -> None:
    pages = sorted(atlas.rglob("*.html"))
    count = 0
    for page in pages:
        for tag, attrs in _tags(page):
            if tag == "img":
                count += 1
                assert (page.parent / attrs["src"]).is_file(), f"{page.name}: {attrs['src']}"
                assert attrs.get("alt"), f"{page.name}: image {attrs['src']} has no alt text"
    assert count > 50  # pictures, crops, tints, saliency rows, compare pairs


def test_documents_validate(atlas: Path) -> None:
    documents = [atlas / "data" / "atlas.json", *sorted((atlas / "data" / "class").glob("*.json"))]
    assert len(documents) == 1 + len(NAMES)
    for path in documents:
        validate(json.loads(path.read_text()), str(path))


def test_a_document_breaking_the_schema_is_refused_naming_the_file(tmp_path: Path) -> None:
    out = write_atlas(tmp_path / "atlas")
    path = out / "data" / "class" / "1.json"
    document = json.loads(path.read_text())
    document["concepts"][0]["importance"] = 2.0  # a share above 1
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"data/class/1\.json: concepts/0/importance"):
        render_site(out)
    assert not (out / "index.html").exists() and not (out / "class").exists()  # nothing half-written


def test_missing_class_document_and_missing_image_are_refused(tmp_path: Path) -> None:
    out = write_atlas(tmp_path / "atlas")
    (out / "data" / "class" / "2.json").unlink()
    with pytest.raises(ValueError, match=r"class 2 \(two\) has no data/class/2\.json"):
        render_site(out)
    out = write_atlas(tmp_path / "other")
    picture = json.loads((out / "data" / "class" / "0.json").read_text())["concepts"][1]["picture"]  # not on the index
    (out / picture).unlink()
    with pytest.raises(ValueError, match=rf"data/class/0\.json: .*{re.escape(picture)}"):
        render_site(out)


def test_class_page_orders_concepts_by_importance_and_marks_the_flag(atlas: Path) -> None:
    html = (atlas / "class" / "0.html").read_text()
    positions = [html.index(f'id="concept-{j}"') for j in range(len(IMPORTANCE))]
    assert positions == sorted(positions)  # the fixture's ranks follow importance
    cards = re.split(r'<article class="concept', html)[1:]
    flagged = {j for j, card in enumerate(cards) if "⚑ shortcut" in card.split("</header>")[0]}
    assert flagged == {1}  # class 0's concept 1 (not its top one) is the flagged shortcut
    assert 'class="concept flagged" id="concept-1"' in html
    # the importance chart lists the concepts in the same order, flagged bar outlined
    chart = html[html.index('id="importance"'):html.index('id="concepts"')]
    assert [m for m in re.findall(r">(c\d)</text>", chart)] == [f"c{j}" for j in range(len(IMPORTANCE))]
    assert chart.count("bar-flagged") == 1
    # the crops are behind a closed <details>; a class outside the atlas is named, not linked
    assert '<details class="crops" id="crops-0">' in html and "<details class=\"crops\" id=\"crops-0\" open" not in html
    assert "seven" in html and "7.html" not in html


def test_class_page_shows_each_section(atlas: Path) -> None:
    html = (atlas / "class" / "2.html").read_text()
    for section in ("importance", "concepts", "proximity", "map", "saliency", "background", "certified", "compare", "timeline"):
        assert f'<section id="{section}"' in html, section
    assert html.count('class="map-point"') == 12 and 'id="map-tip"' in html
    assert "top crop (MACO off)" in html  # class 2's last concept has no MACO picture
    assert 'rel="prev" href="../class/1.html"' in html and 'rel="next"' not in html
    assert "Unmatched in baseline" in html
    timeline = html.split('<section id="timeline"')[1]
    assert "Background swap drop" in timeline and timeline.count("35.0%") == 1 and "5.0%" in timeline
    assert "Background swap drop: 35.0% → — → 5.0%" in (atlas / "timeline.html").read_text()


def test_index_page_content(atlas: Path) -> None:
    html = (atlas / "index.html").read_text()
    assert 'id="class-search"' in html and html.count('class="class-card') == len(NAMES)
    assert "&lt;b&gt;not bold&lt;/b&gt; &amp; escaped" in html  # the config is escaped, not interpreted
    assert html.count("<svg") == 4  # one chart per logged series
    assert 'href="class/0.html#concept-1"' in html and 'href="class/1.html#concept-0"' in html  # the flags
    assert 'src="img/class/0/concept_1_picture.png" alt="Flagged concept c1 of class zero"' in html  # with pictures
    assert "Held-out accuracy" in html and "Certified accuracy" in html
    # the background-reliant class is listed and linked to its swap; the compared model's count beside it
    flags = html.split('id="background-flags"')[1].split("</section>")[0]
    assert flags.count("⚑ background") == 1 and 'href="class/1.html#background"' in flags
    assert "<th scope=\"row\">Background-reliant classes</th><td>1</td><td>1</td>" in html


def test_class_page_shows_the_background_swap(atlas: Path) -> None:
    html = (atlas / "class" / "1.html").read_text()
    section = html.split('<section id="background"')[1].split("</section>")[0]
    assert "⚑ background-reliant" in section and "drop 40.0%" in section
    assert section.count("background_swapped_") == 2 and section.count("(changed)") == 1 and "predicted two (changed)" in section
    assert "c1 carries it." in section and 'href="#concept-1">c1</a> 60%' in section
    assert html.count("⚑ carries the background dependence · 60%") == 1  # on concept c1's card
    index = (atlas / "index.html").read_text()
    assert 'href="class/1.html#concept-1">c1</a> (60% of the drop)' in index
    assert '<section id="background"' in (atlas / "class" / "0.html").read_text()
    assert "⚑ background" not in (atlas / "class" / "0.html").read_text().split('<section id="background"')[1].split("</section>")[0]


def test_curves_are_grouped_training_first_diagnostics_folded(atlas: Path) -> None:
    html = (atlas / "index.html").read_text()
    groups = re.findall(r'<details class="curve-group"( open)?>\s*<summary>(\w+)/', html)
    assert groups == [(" open", "train"), (" open", "val"), ("", "saliency")]


def test_without_optional_sections(tmp_path: Path) -> None:
    out = write_atlas(tmp_path / "atlas", compare=False, timeline=False, curves=False, certified=False, maco=False,
                      background=False)
    (out / "timeline.html").write_text("stale")  # from an earlier render with --timeline
    written = render_site(out)
    assert not (out / "timeline.html").exists()
    assert out / "class" / "0.html" in written and check_links(out) == []
    html = (out / "class" / "0.html").read_text()
    for section in ("certified", "compare", "timeline", "background"):
        assert f'<section id="{section}"' not in html
    assert "MACO picture" not in html  # the top crops stand in
    index = (out / "index.html").read_text()
    assert "<svg" not in index and "timeline.html" not in index and "Certified accuracy" not in index
    assert "Not measured: it needs human maps" in index


def test_no_network_url_in_any_output_file(atlas: Path) -> None:
    assert network_urls(atlas) == []
    (atlas / "static" / "extra.css").write_text("@import url(https://cdn.example/x.css);")
    assert network_urls(atlas) == ["static/extra.css"]


def test_check_links_reports_what_is_broken(atlas: Path) -> None:
    page = atlas / "class" / "0.html"
    html = page.read_text()
    crop = re.search(r'src="(\.\./img/class/0/concept_0_crop_0\.png)"', html).group(1)
    (page.parent / crop).unlink()
    page.write_text(html.replace("</main>", '<a href="https://example.org/">x</a><a href="#nowhere">y</a></main>'))
    problems = check_links(atlas)
    assert any(crop in p and "missing file" in p for p in problems)
    assert any("https://example.org/" in p and "network" in p for p in problems)
    assert any("#nowhere" in p for p in problems)


def test_svg_charts_scale_with_the_values() -> None:
    bars = bar_chart([{"label": "a", "value": 0.6, "color": "#000000"}, {"label": "b", "value": 0.3, "color": "#000000"}], "t")
    widths = [float(w) for w in re.findall(r'<rect x="\d+" y="[\d.]+" width="([\d.]+)"', bars)]
    assert widths[0] == pytest.approx(2 * widths[1])
    lines = line_chart([{"name": "s", "color": "#000000", "points": [(0, 1.0), (1, None), (2, 2.0), (3, 3.0)]}], "t")
    assert lines.count("<polyline") == 1  # the gap splits the line; a lone point draws no segment
    cells = heatmap([[1.0, -1.0], [-1.0, 1.0]], ["a", "b"], ["#000000", "#000000"], "t")
    assert cells.count('fill="#2b6cb0"') == 2 and cells.count('fill="#c53030"') == 2
    assert "<script" not in bar_chart([{"label": "<script>", "value": 1.0, "color": "#000000"}], "<script>")


def test_real_browser_finds_no_error(atlas: Path, tmp_path: Path) -> None:
    missing = chromium_available()
    if missing is not None:
        pytest.skip(f"no headless browser: {missing}; run `make browser` to install chromium and chromedriver")
    start = time.monotonic()
    report = check_site(atlas, screenshots=tmp_path / "shots")
    assert report.errors == 0, report.as_dict()
    assert set(report.pages) == {"index.html", "timeline.html", *(f"class/{i}.html" for i in range(len(NAMES)))}
    assert report.search["shown"] == report.search["expected"] == 1 < report.search["total"]  # the search filters
    assert report.crops_opened == len(NAMES) and report.hovers == len(NAMES)  # crops open, map images show
    assert len(report.screenshots) == len(report.pages) and all(Path(s).stat().st_size > 1000 for s in report.screenshots)
    assert time.monotonic() - start < 60


def test_real_browser_reports_a_broken_site(atlas: Path) -> None:
    missing = chromium_available()
    if missing is not None:
        pytest.skip(f"no headless browser: {missing}; run `make browser` to install chromium and chromedriver")
    (atlas / "img" / "class" / "1" / "concept_0_tint_0.png").unlink()
    js = atlas / "static" / "atlas.js"
    js.write_text(js.read_text() + "\nundefinedFunction();\n")
    report = check_site(atlas)
    assert any("concept_0_tint_0.png" in b for b in report.broken_images)
    assert any("undefinedFunction" in e for e in report.console_errors)
    assert report.errors >= 2


def test_percentages_never_read_minus_zero() -> None:
    assert (fmt_pct(-0.0001, 0), fmt_pct(-0.0004), fmt_pct(-0.02, 0), fmt_pct(0.5), fmt_pct(None)) == ("0%", "0.0%", "-2%", "50.0%", "—")
