"""Open a rendered atlas in a real browser (headless Chromium through Selenium) and report what is broken.

:func:`check_site` opens ``index.html`` from disk (``file://``, as a user would), follows every link to
the site's pages, and on each page reads the console (errors), every ``<a>`` (does it resolve to a file
of the atlas?) and every ``<img>`` (did it decode: ``naturalWidth > 0``?). It also uses the site: types
in the index's search box and checks that exactly the matching class cards stay, clicks a concept
picture and checks its top crops become visible, hovers a dot of the 2-D map and checks its image
shows, and follows the random-class link. Used by the tests and the atlas benchmark.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from harmonia.atlas.render import _parse

CHROMIUM = os.environ.get("HARMONIA_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("HARMONIA_CHROMEDRIVER", "/usr/bin/chromedriver")


@dataclass
class SiteReport:
    """What the browser found; ``errors`` counts every problem (0 for a healthy site)."""

    pages: list[str] = field(default_factory=list)  # pages visited, relative to the atlas folder
    console_errors: list[str] = field(default_factory=list)  # SEVERE console entries, "page: message"
    broken_links: list[str] = field(default_factory=list)  # "page: href (why)"
    broken_images: list[str] = field(default_factory=list)  # "page: src"
    failures: list[str] = field(default_factory=list)  # interactions that did not behave (search, crops, hover)
    search: dict[str, Any] = field(default_factory=dict)  # the query typed and the cards it left
    crops_opened: int = 0  # concept crop panels opened by a click and seen with their images
    hovers: int = 0  # map dots whose image showed on hover
    screenshots: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        """Total number of problems of every kind."""
        return len(self.console_errors) + len(self.broken_links) + len(self.broken_images) + len(self.failures)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, ``errors`` included."""
        return {**asdict(self), "errors": self.errors}


def chromium_available() -> str | None:
    """``None`` when Selenium, Chromium and chromedriver are all present; otherwise why not."""
    if importlib.util.find_spec("selenium") is None:
        return "the selenium package is not installed (pip install -e '.[dev]')"
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not (Path(path).is_file() and os.access(path, os.X_OK))]
    if missing:
        return f"{' and '.join(missing)} not found (install Debian chromium and chromium-driver: run `make browser`)"
    return None


def _driver(width: int = 1280, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


_LINKS_JS = """
return Array.from(document.querySelectorAll('a')).map(function (a) {
  var href = a.getAttribute('href');
  return href === null ? null : new URL(href, document.baseURI).href;
});"""
_IMAGES_JS = """
return Array.from(document.images).map(function (i) {
  return [i.getAttribute('src') || '', i.complete, i.naturalWidth];
});"""


def _wait(condition, timeout: float = 3.0) -> bool:
    """Poll ``condition()`` until it is truthy or ``timeout`` seconds passed."""
    end = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.05)


def _image_ok(driver, element) -> bool:
    return bool(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0;", element))


class _Visit:
    """One browser session over one atlas folder, filling a :class:`SiteReport`."""

    def __init__(self, driver, out: Path, screenshots: Path | None) -> None:
        self.driver, self.out, self.shots = driver, out, screenshots
        self.report = SiteReport()

    def relative(self, url: str) -> str | None:
        """The file an URL names, relative to the atlas folder (None when it is not a file of it)."""
        parts = urlsplit(url)
        if parts.scheme != "file":
            return None
        target = Path(unquote(parts.path)).resolve()
        if target != self.out and self.out not in target.parents:
            return None
        return target.relative_to(self.out).as_posix()

    def console(self, page: str) -> None:
        for entry in self.driver.get_log("browser"):
            if entry.get("level") == "SEVERE":
                self.report.console_errors.append(f"{page}: {entry.get('message')}")

    def links(self, page: str) -> list[str]:
        """Check the page's anchors; returns the atlas pages they lead to."""
        pages = []
        for url in self.driver.execute_script(_LINKS_JS):
            if url is None:
                continue
            target = self.relative(url)
            if target is None:
                self.report.broken_links.append(f"{page}: {url} (not a file of the atlas)")
                continue
            path = self.out / target
            if not path.is_file():
                self.report.broken_links.append(f"{page}: {url} (missing file)")
                continue
            fragment = urlsplit(url).fragment
            if fragment and path.suffix == ".html" and fragment not in _parse(path).ids:
                self.report.broken_links.append(f"{page}: {url} (no element with id {fragment!r})")
            if path.suffix == ".html":
                pages.append(target)
        return pages

    def images(self, page: str) -> None:
        for src, complete, width in self.driver.execute_script(_IMAGES_JS):
            if not complete or not width:
                self.report.broken_images.append(f"{page}: {src}")

    def screenshot(self, page: str) -> None:
        if self.shots is None:
            return
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / (page.replace("/", "_").removesuffix(".html") + ".png")
        try:  # the whole page, not only the window
            size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
            shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 12000), "scale": 1}})
            path.write_bytes(base64.b64decode(shot["data"]))
        except Exception:  # noqa: BLE001 — a driver without CDP still gives the window
            self.driver.save_screenshot(str(path))
        self.report.screenshots.append(str(path))

    # -- interactions ----------------------------------------------------------------------------------

    def try_search(self) -> None:
        from selenium.webdriver.common.by import By

        driver = self.driver
        boxes = driver.find_elements(By.ID, "class-search")
        cards = driver.find_elements(By.CSS_SELECTOR, ".class-card")
        if not boxes:
            self.report.failures.append("index.html: no search box (#class-search)")
            return
        if not cards:
            return
        box = boxes[0]
        names = [(c.get_attribute("data-name"), c.get_attribute("data-id")) for c in cards]
        query = names[-1][0]

        def shown() -> list[bool]:
            return [c.is_displayed() for c in cards]

        box.clear()
        box.send_keys(query.upper())  # the search ignores case
        expected = [query in name or query == cid for name, cid in names]
        ok = _wait(lambda: shown() == expected)
        self.report.search = {"query": query, "total": len(cards), "shown": sum(shown()), "expected": sum(expected)}
        if not ok:
            self.report.failures.append(f"index.html: searching {query!r} shows {sum(shown())} cards, expected {sum(expected)}")
        box.clear()
        box.send_keys("no class has this name")
        empty = driver.find_elements(By.ID, "no-match")
        if not _wait(lambda: not any(shown()) and bool(empty) and empty[0].is_displayed()):
            self.report.failures.append("index.html: a query matching nothing does not empty the grid with a notice")
        box.clear()  # clear() fires no input event: send one, as deleting the text by hand would
        driver.execute_script("arguments[0].dispatchEvent(new Event('input'));", box)
        if not _wait(lambda: all(shown())):
            self.report.failures.append("index.html: clearing the search does not bring every class back")

    def try_crops(self, page: str) -> None:
        from selenium.webdriver.common.by import By

        concepts = self.driver.find_elements(By.CSS_SELECTOR, "article.concept")
        if not concepts:
            return
        concept = concepts[0]
        crops = concept.find_elements(By.CSS_SELECTOR, "details.crops img")
        if not crops:
            return
        if any(c.is_displayed() for c in crops):
            self.report.failures.append(f"{page}: the crops of the first concept show before any click")
            return
        picture = concept.find_element(By.CSS_SELECTOR, ".concept-picture")
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", picture)
        picture.click()
        if _wait(lambda: all(c.is_displayed() and _image_ok(self.driver, c) for c in crops)):
            self.report.crops_opened += 1
        else:
            self.report.failures.append(f"{page}: clicking the first concept's picture does not show its crops")

    def try_hover(self, page: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        dots = self.driver.find_elements(By.CSS_SELECTOR, ".map-point")
        tips = self.driver.find_elements(By.ID, "map-tip")
        if not dots:
            return
        if not tips:
            self.report.failures.append(f"{page}: the map has no tooltip (#map-tip)")
            return
        dot = dots[-1]
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", dot)
        ActionChains(self.driver).move_to_element(dot).perform()
        image = tips[0].find_element(By.TAG_NAME, "img")
        want = dot.get_attribute("data-src")
        if _wait(lambda: tips[0].is_displayed() and image.get_attribute("src").endswith(want.lstrip("./"))
                 and _image_ok(self.driver, image)):
            self.report.hovers += 1
        else:
            self.report.failures.append(f"{page}: hovering a map dot does not show its image")
        ActionChains(self.driver).move_by_offset(0, -400).perform()

    def try_random(self) -> None:
        from selenium.webdriver.common.by import By

        links = self.driver.find_elements(By.CSS_SELECTOR, "a.random-class")
        if not links:
            self.report.failures.append("index.html: no random-class link")
            return
        before = self.driver.current_url
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", links[-1])
        links[-1].click()
        _wait(lambda: self.driver.current_url != before)
        target = self.relative(self.driver.current_url) or self.driver.current_url
        if not target.startswith("class/"):
            self.report.failures.append(f"index.html: the random-class link led to {target}")
        self.console("random class")

    # -- the walk --------------------------------------------------------------------------------------

    def run(self) -> SiteReport:
        queue, seen = ["index.html"], {"index.html"}  # breadth-first over the links, from the index
        while queue:
            page = queue.pop(0)
            self.driver.get((self.out / page).as_uri())
            self.report.pages.append(page)
            for target in self.links(page):
                if target not in seen:
                    seen.add(target)
                    queue.append(target)
            self.images(page)
            if page == "index.html":
                self.try_search()
            elif page.startswith("class/"):
                self.try_crops(page)
                self.try_hover(page)
            self.console(page)
            self.screenshot(page)
        for page in sorted(p.relative_to(self.out).as_posix() for p in self.out.glob("*/*.html")):
            if page not in seen:
                self.report.failures.append(f"{page}: no link of the site leads to it")
        self.driver.get((self.out / "index.html").as_uri())
        self.try_random()
        return self.report


def check_site(out: Path, screenshots: Path | None = None) -> SiteReport:
    """Open the atlas at ``out`` in headless Chromium and report what is broken (see the module doc).

    ``screenshots``: a folder for one full-page PNG per visited page. Raises ``RuntimeError`` saying
    what is missing when Chromium, chromedriver or Selenium is not installed.
    """
    out = Path(out).resolve()
    if not (out / "index.html").is_file():
        raise FileNotFoundError(f"{out / 'index.html'}: no rendered atlas (run render_site first)")
    missing = chromium_available()
    if missing is not None:
        raise RuntimeError(f"cannot check the site in a browser: {missing}")
    driver = _driver()
    try:
        return _Visit(driver, out, None if screenshots is None else Path(screenshots)).run()
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    """``python -m harmonia.atlas.browser ATLAS [--screenshots DIR]``: print the report, exit 1 on errors."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("atlas", type=Path)
    parser.add_argument("--screenshots", type=Path, default=None)
    args = parser.parse_args(argv)
    report = check_site(args.atlas, args.screenshots)
    print(json.dumps(report.as_dict(), indent=1))
    return 1 if report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
