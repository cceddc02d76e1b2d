"""Opening a written report in headless Chromium (the Debian ``chromium`` package, driven by the ``playwright``
Python package, which the ``dev`` extra installs): the one place that knows how to launch it, shared by the
report's browser test and ``scripts/screenshot-report``.

The page is opened offline: every request other than the file itself is refused and recorded, and console
errors and uncaught page errors are collected.

Example:
    >>> LAUNCH_ARGS[:2]
    ('--no-sandbox', '--disable-gpu')
    >>> with visit(Path("runs/safety/report.html")) as seen:  # doctest: +SKIP
    ...     seen.page.screenshot(path="report.png", full_page=True)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsi.errors import InputError

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run")
FIGURES = ".js-plotly-plot:has(svg.main-svg)"
"""CSS selector of a plotly figure that has been drawn."""
_ALL_DRAWN = "[...document.querySelectorAll('.js-plotly-plot')].every(e => e.querySelector('svg.main-svg'))"


def missing() -> str | None:
    """Why a report cannot be opened here (no Chromium, no playwright), or None when it can."""
    if not CHROMIUM.is_file():
        return f"no headless browser: {CHROMIUM} is missing (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "no browser driver: the playwright package is missing (pip install playwright; never `playwright " \
               "install`, the Debian chromium is used)"
    return None


@dataclass
class Visit:
    """An open page and what happened while it loaded."""

    page: Any
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    blocked_requests: list[str] = field(default_factory=list)

    def figure_count(self) -> int:
        """How many plotly figures are drawn on the page."""
        return int(self.page.locator(FIGURES).count())

    def wait_until_drawn(self, *, timeout_s: float = 30.0) -> None:
        """Wait until every plotly figure on the page has drawn its plot."""
        self.page.wait_for_function(_ALL_DRAWN, timeout=timeout_s * 1000)

    def problems(self) -> list[str]:
        """Console errors, page errors and refused network requests, one line each."""
        return ([f"console error: {m}" for m in self.console_errors] + [f"page error: {m}" for m in self.page_errors]
                + [f"network request: {u}" for u in self.blocked_requests])


@contextmanager
def visit(path: Path, *, width: int = 1280, height: int = 900) -> Iterator[Visit]:
    """Open the HTML file at ``path`` in headless Chromium, offline, and wait until it has loaded."""
    why = missing()
    if why is not None:
        raise InputError("Chromium and the playwright package to open a report", why, "install what is missing")
    from playwright.sync_api import sync_playwright

    url = Path(path).resolve().as_uri()
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=list(LAUNCH_ARGS))
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            seen = Visit(page)
            page.on("console", lambda m: seen.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda err: seen.page_errors.append(str(err)))

            def route(request_route: Any) -> None:
                if request_route.request.url == url:
                    request_route.continue_()
                else:
                    seen.blocked_requests.append(request_route.request.url)
                    request_route.abort()

            page.route("**/*", route)
            page.goto(url, wait_until="load")
            yield seen
        finally:
            browser.close()
