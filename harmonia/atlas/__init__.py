"""The explanation atlas: what a checkpoint sees, class by class, as an offline static site.

``harmonia atlas`` (:mod:`harmonia.atlas.command`) selects each class's images, runs the
per-class analysis (:mod:`harmonia.atlas.analysis`: CRAFT concepts, MACO pictures, shortcut
flags, saliency, certificates), writes one JSON document per page (:mod:`harmonia.atlas.schema`)
and renders them to HTML (:mod:`harmonia.atlas.render`); :mod:`harmonia.atlas.browser` checks
the site in headless Chromium.
"""

from harmonia.atlas.analysis import AtlasSettings, ClassAnalysis, analyze_class, class_document, compare_section, timeline_section
from harmonia.atlas.render import check_links, render_site
from harmonia.atlas.schema import SCHEMA_VERSION, validate

_BROWSER = ("SiteReport", "check_site", "chromium_available")


def __getattr__(name: str) -> object:
    """The browser check on first use (so ``python -m harmonia.atlas.browser`` runs it fresh)."""
    if name in _BROWSER:
        from harmonia.atlas import browser

        return getattr(browser, name)
    raise AttributeError(f"module 'harmonia.atlas' has no attribute {name!r}")


__all__ = [
    "SCHEMA_VERSION",
    "AtlasSettings",
    "ClassAnalysis",
    "SiteReport",
    "analyze_class",
    "check_links",
    "check_site",
    "chromium_available",
    "class_document",
    "compare_section",
    "render_site",
    "timeline_section",
    "validate",
]
