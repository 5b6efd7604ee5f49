"""The training report in a real browser: headless Chromium (Playwright driving /usr/bin/chromium) renders the
shared run's report.html with every image loaded, nothing fetched from anywhere, and every confusion-matrix
number readable; the screenshot is kept in test-artifacts/ (gitignored) to look at."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.trainer.conftest import REPO

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"
MIN_CONTRAST = 4.5  # WCAG AA for normal text

CONTRAST_JS = """
() => {
  const parse = (css) => css.match(/\\d+(\\.\\d+)?/g).map(Number);
  const lum = (rgb) => {
    const c = rgb.slice(0, 3).map(v => v / 255)
      .map(v => v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4));
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
  };
  return Array.from(document.querySelectorAll('table.cm td')).map(td => {
    const s = getComputedStyle(td);
    let bg = parse(s.backgroundColor);
    if (bg.length === 4 && bg[3] === 0) bg = [255, 255, 255];   // transparent: the page's white shows through
    const a = lum(parse(s.color)), b = lum(bg);
    const r = b > a ? b : a, d = b > a ? a : b;
    return {text: td.textContent.trim(), ratio: (r + 0.05) / (d + 0.05), size: parseFloat(s.fontSize),
            visible: td.offsetWidth > 0 && td.offsetHeight > 0};
  });
}
"""


def _contrast(fg: str, bg: str) -> float:
    def lum(h: str) -> float:
        c = [int(h[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        c = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    a, b = sorted((lum(fg), lum(bg)))
    return (b + 0.05) / (a + 0.05)


@pytest.mark.parametrize("share", [i / 100 for i in range(0, 101, 5)])
def test_every_confusion_matrix_shade_keeps_its_number_readable(share):
    from trainer.report_html import cell_colors

    bg, fg = cell_colors(share)
    assert _contrast(fg, bg) >= MIN_CONTRAST, (share, bg, fg)


@pytest.mark.slow
def test_report_renders_in_chromium_with_no_broken_image(trained_run):
    from playwright import sync_api

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make test installs it)")
    report = trained_run / "report" / "report.html"
    ev = json.loads((trained_run / "evaluate" / "evaluate.json").read_text())
    requests = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report.as_uri(), wait_until="load")
            images = page.evaluate("""() => Array.from(document.images).map(i => ({
                src: i.src.slice(0, 22), ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}))""")
            cells = page.evaluate(CONTRAST_JS)
            thumbs = page.locator(".thumb").count()
            text = page.inner_text("body")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "trainer-report.png"), full_page=True)
            shutil.copyfile(report, ARTIFACTS / "trainer-report.html")
        finally:
            browser.close()
    assert len(images) >= 6 and all(i["ok"] for i in images), [i for i in images if not i["ok"]]
    assert all(i["src"].startswith("data:image/png;base64") for i in images)
    assert [u for u in requests if not u.startswith("data:")] == [report.as_uri()]   # nothing else fetched
    n = len(ev["class_names"])
    assert len(cells) == n * (n + 1)                       # every cell of the matrix (+ the row totals)
    assert all(c["visible"] and c["text"].isdigit() and c["size"] >= 11 for c in cells)
    low = [c for c in cells if c["ratio"] < MIN_CONTRAST]
    assert not low, f"confusion-matrix numbers with too little contrast: {low}"
    assert thumbs == min(len(ev["mistakes"]), 60)
    for words in ("Gate passed", "Sampling threshold", "Calibration", "Per class", "Misclassified held-out"):
        assert words in text, words
