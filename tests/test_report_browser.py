"""The HTML report in a real headless browser: it loads, the slider moves the slice, no external
resources are fetched. Needs Debian's chromium and Python Playwright (skips cleanly without)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from dipuq.show.report import write_report

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def _browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Python Playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return sync_api


def _phantom(n=20):
    z, y, x = np.mgrid[-1:1:n * 1j, -1:1:n * 1j, -1:1:n * 1j]
    ref = ((x**2 + 1.6 * y**2 + 1.2 * z**2) < 0.7).astype(np.float32) + ((x - 0.3) ** 2 + y**2 + (z - 0.2) ** 2 < 0.08)
    rng = np.random.default_rng(0)
    std = (0.05 + 0.02 * (z + 1)).astype(np.float32)
    recon = (ref + rng.normal(size=ref.shape) * std).astype(np.float32)
    return recon, std, ref.astype(np.float32)


def test_report_slider_in_chromium(tmp_path, artifacts):
    sync_api = _browser()
    recon, std, ref = _phantom()
    path = write_report(tmp_path / "report.html", recon, std, reference=ref,
                        metrics={"psnr": 25.0, "coverage_90": 0.88}, config_text="[dip]\niterations = 5\n",
                        provenance={"seed": 0}, title="browser test", n_slices=8)
    requests = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.resolve().as_uri())
            for axis in "zyx":
                img = page.locator(f"#img-{axis}-zscore")
                label = page.locator(f"#label-{axis}")
                before_src, before_idx = img.get_attribute("src"), label.get_attribute("data-index")
                assert before_idx == "10", "the viewer starts at the middle slice"
                slider = page.locator(f"#slider-{axis}")
                slider.focus()
                page.keyboard.press("Home")  # a real key press fires the 'input' event
                after_src, after_idx = img.get_attribute("src"), label.get_attribute("data-index")
                assert after_idx == "0"
                assert after_src != before_src, f"{axis}: the shown z-score slice did not change"
                assert "0 / 19" in label.inner_text()
                assert page.locator(f"#img-{axis}-recon").get_attribute("src") != before_src
            page.locator("#slider-z").focus()
            page.keyboard.press("End")
            assert page.locator("#label-z").get_attribute("data-index") == "19"
            for axis in "zyx":  # leave every view on a slice through the object for the screenshot
                page.locator(f"#slider-{axis}").focus()
                page.keyboard.press("Home")
                for _ in range(3):
                    page.keyboard.press("ArrowRight")
            assert page.locator("#label-x").get_attribute("data-index") == "8"
            assert page.locator("table").inner_text().count("PSNR") == 1
            page.screenshot(path=str(artifacts / "report_browser.png"), full_page=True)
            assert not errors, f"JavaScript errors: {errors}"
        finally:
            browser.close()
    external = [u for u in requests if not u.startswith(("file:", "data:"))]
    assert not external, f"the report fetched external resources: {external}"
