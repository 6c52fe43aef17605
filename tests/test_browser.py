"""End to end in a real browser: Debian's Chromium, driven by Playwright, against the viewer
served by Streamlit on 127.0.0.1. Screenshots are saved for a person to look at."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import ROOT, load_script

pytestmark = pytest.mark.slow
write_series = load_script("nifti_to_dicom").write_series
sys.path.insert(0, str(ROOT / "benchmarks"))
viewer_sessions = importlib.import_module("viewer_sessions")

CHROMIUM = shutil.which("chromium")
# The load benchmark's Chromium flags, plus WebGL (the 3D view) in software: Chromium no longer
# falls back to it by itself.
CHROMIUM_ARGS = [*viewer_sessions.CHROMIUM_ARGS, "--enable-unsafe-swiftshader"]


@pytest.fixture
def chromium_path() -> str:
    if CHROMIUM is None:
        message = "Debian's chromium is not installed (make test installs it where apt-get may run)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


def serve(tmp_path: Path, *flags: str):
    """The viewer served on a free port of 127.0.0.1 with Streamlit ``flags``: (its URL, the process)."""
    try:
        return viewer_sessions.serve(tmp_path, *flags)
    except RuntimeError as error:
        pytest.fail(str(error))


@pytest.fixture
def server(tmp_path):
    url, process = serve(tmp_path)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def shots(tmp_path) -> Path:
    """Where screenshots go: $SEGMENT_SCREENSHOTS (docs/images when the docs' pictures are
    retaken), else the test's own folder."""
    folder = Path(os.environ.get("SEGMENT_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser_page(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        yield browser.new_page(viewport={"width": 1400, "height": 1800})
        browser.close()


def summary(page) -> str:
    return page.locator("p", has_text="Against all skips on").first.inner_text()


def wait_for_pictures(page, count: int) -> None:
    page.wait_for_function(
        "(count) => { const pictures = [...document.querySelectorAll('[data-testid=\"stImage\"] img')];"
        " return pictures.length >= count && pictures.every(p => p.complete && p.naturalWidth > 0); }",
        arg=count,
        timeout=120_000,
    )


def axial_source(page) -> str:
    return page.locator('[data-testid="stImage"] img').first.get_attribute("src")


def upload_scan(page, path: Path) -> None:
    page.wait_for_selector('[data-testid="stFileUploader"]', timeout=60_000)
    page.locator('[data-testid="stFileUploader"] input[type="file"]').first.set_input_files(str(path))


def flip(page, key: str, label: str) -> None:
    """Click the toggle (or checkbox) of widget ``key`` and wait for the page to settle."""
    page.locator(f".st-key-{key}").get_by_text(label).click()
    settle(page)


def settle(page) -> None:
    """Wait until Streamlit has finished the rerun a widget started, and its pictures are drawn."""
    page.wait_for_timeout(300)  # the rerun starts after the widget's message reaches the server
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=120_000
    )
    wait_for_pictures(page, 3)


def test_upload_then_switch_a_skip_off_in_a_real_browser(server, browser_page, hippocampus_root, shots):
    page = browser_page
    scan = hippocampus_root / "Task04_Hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    page.goto(server)
    upload_scan(page, scan)
    page.get_by_text("Against all skips on").first.wait_for(timeout=120_000)
    wait_for_pictures(page, 3)
    before_picture, before_numbers = axial_source(page), summary(page)
    assert "Anterior Dice 1.000" in before_numbers
    page.screenshot(path=str(shots / "viewer_all_skips_on.png"), full_page=True)

    # The switch of level 1 (levels count from 1, its widget key too: skip_level_1).
    switch = page.locator(".st-key-skip_level_1")
    assert "level 1 - full resolution" in switch.inner_text()
    switch.get_by_text("level 1 - full resolution").click()
    page.wait_for_function(
        "(before) => document.querySelector('[data-testid=\"stImage\"] img').getAttribute('src') !== before",
        arg=before_picture,
        timeout=60_000,
    )
    wait_for_pictures(page, 6)
    after_numbers = summary(page)
    page.screenshot(path=str(shots / "viewer_level1_off.png"), full_page=True)
    assert after_numbers != before_numbers
    assert "Anterior Dice 1.000" not in after_numbers


def test_a_zipped_dicom_series_its_uncertainty_3d_view_and_a_second_model_in_a_real_browser(
    server, browser_page, hippocampus_root, shots, tmp_path
):
    """The hippocampus scan as a zipped DICOM series: its overlay, the uncertainty map, the 3D
    view (WebGL), and the ensemble compared with one of its members."""
    source = hippocampus_root / "Task04_Hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    series = write_series(sitk.ReadImage(str(source)), tmp_path / "series", "1.2.826.0.1.3680043.2.1125.9")
    archive = tmp_path / "hippocampus_001_dicom.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(series.iterdir()):
            zipped.write(path, f"hippocampus_001/{path.name}")
    page = browser_page
    page.goto(server)
    assert "500MB per file" in page.locator('[data-testid="stFileUploader"]').first.inner_text()
    upload_scan(page, archive)
    page.get_by_text("Against all skips on").first.wait_for(timeout=120_000)
    wait_for_pictures(page, 3)
    assert "Anterior Dice 1.000" in summary(page)
    page.screenshot(path=str(shots / "viewer_dicom_zip.png"), full_page=True)

    flip(page, "uncertainty", "Uncertainty map")
    page.get_by_text("Samples: the 3 members of the ensemble.").wait_for(timeout=60_000)
    wait_for_pictures(page, 6)
    assert page.get_by_text("axial: uncertainty").count() == 1
    page.screenshot(path=str(shots / "viewer_uncertainty.png"), full_page=True)
    flip(page, "uncertainty", "Uncertainty map")

    flip(page, "view_3d", "3D view")
    chart = page.locator('[data-testid="stPlotlyChart"] .js-plotly-plot')
    chart.wait_for(timeout=60_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=\"stPlotlyChart\"] canvas')].some(c => c.width > 0)",
        timeout=60_000,
    )
    legend = chart.locator(".legendtext").all_text_contents()
    assert legend == ["Anterior", "Posterior"]
    chart.scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "viewer_3d.png"), full_page=True)
    flip(page, "view_3d", "3D view")

    page.locator(".st-key-compare").click()
    page.get_by_role("option", name="hippocampus_3d/member_1 (bundled ensemble member)").click()
    page.get_by_text("Where the two differ").first.wait_for(timeout=120_000)
    wait_for_pictures(page, 9)
    assert page.get_by_text("axial: differences").count() == 1
    page.screenshot(path=str(shots / "viewer_compare.png"), full_page=True)


def test_the_example_loads_and_an_upload_over_the_limit_gets_one_sentence(browser_page, tmp_path, shots):
    """Served with a 1 MB cap: a 2 MB file is refused in the browser with one sentence; then
    "Try an example" segments the bundled case and scores it against its labels."""
    url, process = serve(tmp_path, "--server.maxUploadSize", "1")
    try:
        page = browser_page
        page.goto(url)
        big = tmp_path / "big.nii.gz"
        big.write_bytes(os.urandom(2 * 1024 * 1024))
        assert "1MB per file" in page.locator('[data-testid="stFileUploader"]').first.inner_text()
        upload_scan(page, big)
        refusal = page.get_by_text("Error: File must be 1.0MB or smaller.")
        refusal.wait_for(timeout=30_000)
        page.wait_for_function(
            '() => document.querySelector(\'[data-testid="stFileUploader"] span[role="alert"]\')'
            ".getBoundingClientRect().width > 50",
            timeout=10_000,
        )  # shown to everyone, not only to screen readers
        page.screenshot(
            path=str(shots / "viewer_upload_limit.png"), clip={"x": 0, "y": 0, "width": 1400, "height": 560}
        )

        page.get_by_role("button", name="Try an example").click()
        page.get_by_text("Against all skips on").first.wait_for(timeout=120_000)
        wait_for_pictures(page, 3)
        page.get_by_text("HD95 in mm; NSD with a tolerance of").wait_for(
            timeout=30_000
        )  # scored against its labels
        page.screenshot(path=str(shots / "viewer_example.png"), full_page=True)
    finally:
        process.terminate()
        process.wait(timeout=30)


def coloured_share(page, picture) -> float:
    """The share of a shown picture's pixels that are not grey: the mask over the scan."""
    import io

    import numpy as np
    from PIL import Image

    served = page.request.get(picture.evaluate("image => image.src"))  # absolute, as the page fetched it
    rgb = np.asarray(Image.open(io.BytesIO(served.body())).convert("RGB")).astype(int)
    return float(np.mean(np.ptp(rgb, axis=2) > 20))


def test_a_two_channel_scan_shows_the_channel_picked_under_its_mask_in_a_real_browser(
    browser_page, hippocampus_root, shots, tmp_path
):
    """A tiny two-channel model trained into the store the viewer serves: a 4D upload is
    segmented, "Channel shown" draws the gradient-magnitude channel under the same mask, and a
    3D scan gets the one-sentence refusal."""
    import re

    from test_multichannel import CASE, CHANNEL_NAMES, MODEL_NAME, train_two_channel

    task, _ = train_two_channel(tmp_path, hippocampus_root, epochs=3)
    url, process = serve(tmp_path)
    try:
        page = browser_page
        page.goto(url)
        page.wait_for_selector('[data-testid="stFileUploader"]', timeout=60_000)  # the page has run once
        page.locator(".st-key-model").click()
        page.get_by_role("option", name=re.compile(f"^{MODEL_NAME} v1")).click()
        upload_scan(page, task / "imagesTr" / f"{CASE}.nii.gz")
        page.get_by_text("Against all skips on").first.wait_for(timeout=120_000)
        wait_for_pictures(page, 3)
        first_channel = axial_source(page)

        page.locator(".st-key-channel").click()
        page.get_by_role("option", name=CHANNEL_NAMES[1]).click()
        page.wait_for_function(
            "(before) => document.querySelector('[data-testid=\"stImage\"] img').getAttribute('src') !== before",
            arg=first_channel,
            timeout=60_000,
        )
        settle(page)
        shown = page.locator('[data-testid="stImage"] img').first
        assert coloured_share(page, shown) > 0.02, "the mask is drawn over the channel"
        page.screenshot(path=str(shots / "viewer_two_channels.png"), full_page=True)

        upload_scan(page, hippocampus_root / "Task04_Hippocampus" / "imagesTr" / f"{CASE}.nii.gz")
        page.get_by_text("but the model reads 2; give a scan with one channel per model input.").wait_for(
            timeout=60_000
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
