"""End to end in a real browser: Debian's Chromium, driven by Playwright, against the viewer
served by Streamlit on 127.0.0.1. Screenshots are saved for a person to look at."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_port

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def chromium_path() -> str:
    if CHROMIUM is None:
        message = "Debian's chromium is not installed (make test installs it where apt-get may run)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(ROOT / "app" / "viewer.py"),
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            time.sleep(0.3)
    else:
        process.kill()
        pytest.fail("the viewer did not answer /_stcore/health within 60 s")
    yield url
    process.terminate()
    process.wait(timeout=30)


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


def test_upload_then_switch_a_skip_off_in_a_real_browser(server, chromium_path, hippocampus_root, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("SEGMENT_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    scan = hippocampus_root / "Task04_Hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(server)
        page.wait_for_selector('[data-testid="stFileUploader"]', timeout=60_000)
        page.locator('[data-testid="stFileUploader"] input[type="file"]').first.set_input_files(str(scan))
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
        browser.close()
    assert after_numbers != before_numbers
    assert "Anterior Dice 1.000" not in after_numbers
