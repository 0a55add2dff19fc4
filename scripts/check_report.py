"""Open a handsoff report in headless Chromium: no console errors, no page errors, every image decoded, every
section present; save a full-page screenshot.

    python scripts/check_report.py handsoff-demo/report.html --screenshot docs/report.png

Needs Chromium and Playwright's Python driver, neither of which handsoff itself uses:
    apt-get install chromium && pip install playwright      (no browser download: the system Chromium is used)
Exits 1 and lists the problems when the page is not clean.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

SECTIONS = ("Downstream network on real test images", "Inversion of the labeled images",
            "Label generator on the reconstructions", "Generated samples", "Class frequencies")


def check(report: Path, screenshot: Path | None, chromium: str) -> list[str]:
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
                else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url[:80]}"))
        page.goto(report.resolve().as_uri(), wait_until="load")
        broken = page.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length")
        if broken:
            problems.append(f"{broken} image(s) did not decode")
        images = page.evaluate("document.images.length")
        svgs = page.evaluate("document.querySelectorAll('svg').length")
        text = page.inner_text("body")
        problems += [f"section missing: {s}" for s in SECTIONS if s not in text]
        if screenshot:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        print(f"{report}: {images} images, {svgs} plot(s), {len(text)} characters of text")
        browser.close()
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    if not args.report.is_file():
        print(f"{args.report}: no such report", file=sys.stderr)
        return 1
    problems = check(args.report, args.screenshot, args.chromium)
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    print("clean" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
