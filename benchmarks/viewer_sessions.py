"""The viewer under load: concurrent browser sessions against one viewer server, each uploading
its own hippocampus case and switching long skips off and on. Reports the latency from a
switch's click to its new overlay drawn (median and 95th percentile), the server's peak memory,
and whether every session saw its own result.

One server serves two phases in turn: one session alone, then ``--sessions`` at once, each in
its own context of one Chromium driven by Playwright's async API. What each session should show
after each switch (the mask line and the "Against all skips on" numbers) is computed first in
this process with the library, case by case: a session shown another case's mask, or switches
that another session made, fails the check.

    python benchmarks/viewer_sessions.py [--sessions 8] [--quick]   # run alone, not by make bench
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
from common import ROOT, Row, finish, section_parser
from playwright.async_api import TimeoutError as PlaywrightTimeout
from playwright.async_api import async_playwright
from segment.app.metrics_table import against_all_on, metrics_table
from segment.app.page_state import mask_text, model_choices, skip_key
from segment.app.rendering import PLANES
from segment.app.uploads import read_upload

from segment.data.tasks import resolve_data_root
from segment.models.sources import bundled_members, bundled_models
from segment.workflows import explore, load

VIEWER = ROOT / "app" / "viewer.py"
# Debian's Chromium, headless: no GPU, no network chatter (tests/test_browser.py adds to these).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 1800}
# Generous: eight sessions segment at once on two cores another job may be using too.
VIEW_TIMEOUT_MS = 300_000
RSS_SAMPLE_SECONDS = 0.1

ERRORS_SHOWN = '[data-testid="stException"], [data-testid="stAlertContentError"]'
UPLOADER = '[data-testid="stFileUploader"] input[type="file"]'
# True once the run a click started has finished drawing: the mask line names the new skip
# mask, a summary line is there, every picture has loaded, and no element is left over from the
# run before (Streamlit marks those data-stale until the new run replaces or drops them). True
# at once too when the page shows an error, which no waiting mends. Whether the numbers are the
# right ones is checked afterwards, so that a wrong result fails at once rather than by timeout.
RUN_DRAWN = """([maskLine, errors]) => {
  if (document.querySelector(errors)) return true;
  const texts = [...document.querySelectorAll('[data-testid="stMarkdownContainer"] p')].map(p => p.innerText);
  const pictures = [...document.querySelectorAll('[data-testid="stImage"] img')];
  return !document.querySelector('[data-testid="stElementContainer"][data-stale="true"]')
    && texts.some(text => text.startsWith(maskLine))
    && texts.some(text => text.startsWith('Against all skips on'))
    && pictures.length > 0 && pictures.every(p => p.complete && p.naturalWidth > 0);
}"""
# What the page shows now, in View's terms.
PAGE_VIEW = """() => {
  const texts = [...document.querySelectorAll('[data-testid="stMarkdownContainer"] p')].map(p => p.innerText);
  return {
    mask_line: texts.find(text => text.startsWith('Mask (skips')) ?? '',
    summary: texts.find(text => text.startsWith('Against all skips on')) ?? '',
    pictures: document.querySelectorAll('[data-testid="stImage"] img').length,
  };
}"""


@dataclass(frozen=True)
class View:
    """What the page shows for one scan and skip mask."""

    mask_line: str  # the start of the line above the mask pictures: "Mask (skips 0111)"
    summary: str  # "Against all skips on: Anterior Dice 0.974, +0.001 mL, ..."
    pictures: int  # the mask row, and the lost/gained row once a skip is off


@dataclass(frozen=True)
class CasePlan:
    """One session's case and the views it must see: after the upload, then after each switch."""

    scan: Path
    uploaded: View
    switches: list[tuple[int, View]]  # (the level clicked, the view it must lead to)


@dataclass
class SessionRun:
    """What one session measured, and whether it saw its own result throughout."""

    case: str
    upload_seconds: float | None = None
    switch_seconds: list[float] = field(default_factory=list)
    problem: str | None = None  # the first thing that went wrong, and what the page showed then

    @property
    def own_result(self) -> bool:
        return self.problem is None


def switch_levels(levels: int, switches: int) -> list[int]:
    """Levels to click in turn: every skip off finest first, then back on (``levels`` = 4,
    ``switches`` = 8: 0111, 0011, 0001, 0000, 1000, 1100, 1110, 1111)."""
    return [index % levels + 1 for index in range(switches)]


def plan_cases(scans: list[Path], switches: int) -> list[CasePlan]:
    """Each case's views, computed as the viewer computes them for its default model, in this
    process and before any session starts (so that they do not load the server's CPUs)."""
    spec = next(iter(model_choices(bundled_models(), [], bundled_members()).values()))
    model = load(spec)
    built = tuple(model.network.resolve_skip_mask(None))
    names = model.config.label_names

    def plan(path: Path) -> CasePlan:
        scan = read_upload(path.name, path.read_bytes(), "scan", model.config.model.in_channels).scan
        explorer = explore(model, scan)
        reference = explorer.mask(built)

        def view(skip_mask: tuple[bool, ...]) -> View:
            mask = explorer.mask(skip_mask)
            table = metrics_table(names, scan, mask, explorer.compare(mask, reference))
            return View(
                f"Mask (skips {mask_text(skip_mask)})",
                against_all_on(table, scan).replace("**", ""),
                len(PLANES) * (1 if skip_mask == built else 2),
            )

        skip_mask, steps = list(built), []
        for level in switch_levels(len(built), switches):
            skip_mask[level - 1] = not skip_mask[level - 1]
            steps.append((level, view(tuple(skip_mask))))
        return CasePlan(path, view(built), steps)

    return [plan(path) for path in scans]


def distinguishable(plans: list[CasePlan]) -> bool:
    """Whether every two cases show different numbers somewhere along the switches: only then
    does a session shown another's result fail the check."""
    sequences = [tuple(view.summary for _, view in plan.switches) for plan in plans]
    return len(set(sequences)) == len(sequences)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(folder: Path, *flags: str) -> tuple[str, subprocess.Popen]:
    """The viewer on a free port of 127.0.0.1 with Streamlit ``flags`` and an empty MLflow store
    in ``folder``: (its URL, the process). Streamlit's output goes to ``folder``/viewer.log."""
    port = free_port()
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    command = [
        sys.executable, "-m", "streamlit", "run", str(VIEWER),
        "--server.port", str(port), "--server.address", "127.0.0.1",
        "--server.headless", "true", "--browser.gatherUsageStats", "false", *flags,
    ]  # fmt: skip
    with (folder / "viewer.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                if answer.status == 200:
                    return url, process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"the viewer did not answer /_stcore/health within 120 s; see {folder / 'viewer.log'}")


def tree_rss_mb(process: psutil.Process) -> float:
    """Resident memory of a process and its children, in MB."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        # A child that ended between the listing and the reading counts for nothing.
        with contextlib.suppress(psutil.NoSuchProcess):
            total += member.memory_info().rss
    return total / 2**20


class PeakRss:
    """Samples a process tree's resident memory in a thread while the ``with`` block runs."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, tree_rss_mb(self.process))
            if self._stop.wait(RSS_SAMPLE_SECONDS):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def shows_error(page) -> str | None:
    """The first error the page shows, if any."""
    errors = page.locator(ERRORS_SHOWN)
    return await errors.first.inner_text() if await errors.count() else None


async def page_view(page) -> dict:
    return await page.evaluate(PAGE_VIEW)


class Session:
    """One browser session on the viewer: its own Chromium context, one case."""

    def __init__(self, browser, url: str, plan: CasePlan) -> None:
        self.browser, self.url, self.plan = browser, url, plan
        self.run = SessionRun(plan.scan.name.removesuffix(".nii.gz"))

    async def open(self) -> None:
        self.context = await self.browser.new_context(viewport=VIEWPORT)
        self.page = await self.context.new_page()
        await self.page.goto(self.url)

    async def close(self) -> None:
        await self.context.close()

    async def upload(self) -> None:
        """Upload the case once the page offers it (the model is loaded by then), and time it
        to the first overlay."""
        try:
            await self.page.locator(f"{UPLOADER}, {ERRORS_SHOWN}").first.wait_for(
                state="attached", timeout=VIEW_TIMEOUT_MS
            )
        except PlaywrightTimeout:
            self.run.problem = "before the upload: the page never offered the upload"
            return
        error = await shows_error(self.page)
        if error:
            self.run.problem = f"before the upload: the page shows an error: {error}"
            return
        start = time.perf_counter()
        await self.page.locator(UPLOADER).first.set_input_files(str(self.plan.scan))
        drawn = await self._reached(self.plan.uploaded, "after the upload")
        if drawn is not None:
            self.run.upload_seconds = drawn - start

    async def switch(self) -> None:
        """Click each planned skip switch, timing the click to its view drawn in full; stop at
        the first view that does not come."""
        for step, (level, view) in enumerate(self.plan.switches, start=1):
            if not self.run.own_result:
                return
            start = time.perf_counter()
            await self.page.locator(f".st-key-{skip_key(level)} label").first.click()
            drawn = await self._reached(view, f"after switch {step} (level {level})")
            if drawn is not None:
                self.run.switch_seconds.append(drawn - start)

    async def _reached(self, view: View, when: str) -> float | None:
        """When (``time.perf_counter``) the page had drawn ``view``'s run, if it shows ``view``
        with no error; else None, and what it showed instead is noted."""
        try:
            await self.page.wait_for_function(
                RUN_DRAWN, arg=[view.mask_line, ERRORS_SHOWN], timeout=VIEW_TIMEOUT_MS
            )
        except PlaywrightTimeout:
            shown = await page_view(self.page)
            self.run.problem = f"{when}: no '{view.mask_line}' within {VIEW_TIMEOUT_MS / 1000:.0f} s: {shown}"
            return None
        drawn = time.perf_counter()
        error = await shows_error(self.page)
        shown = await page_view(self.page)
        if error:
            self.run.problem = f"{when}: the page shows an error: {error}"
        elif shown["summary"] != view.summary or shown["pictures"] != view.pictures:
            self.run.problem = f"{when}: expected {asdict(view)}, the page shows {shown}"
        return None if self.run.problem else drawn


async def run_phase(
    browser, url: str, plans: list[CasePlan], server_pid: int
) -> tuple[list[SessionRun], float]:
    """All of ``plans`` at once, one session each: uploads together, then switches together, so
    that every switch is timed while every other session switches too. (The runs, the server's
    peak RSS in MB.) A closed session's state stays on the server until Streamlit drops it
    (``server.disconnectedSessionTTL``, 2 minutes), so a later phase's peak counts it too."""
    sessions = [Session(browser, url, plan) for plan in plans]
    with PeakRss(server_pid) as rss:
        await asyncio.gather(*(session.open() for session in sessions))
        await asyncio.gather(*(session.upload() for session in sessions))
        await asyncio.gather(*(session.switch() for session in sessions))
    await asyncio.gather(*(session.close() for session in sessions))
    return [session.run for session in sessions], round(rss.peak_mb, 1)


def latency_figures(runs: list[SessionRun]) -> dict:
    switches = [seconds for run in runs for seconds in run.switch_seconds]
    uploads = [run.upload_seconds for run in runs if run.upload_seconds is not None]

    def rounded(values: list[float], percentile: float) -> float | None:
        return round(float(np.percentile(values, percentile)), 3) if values else None

    return {
        "switches": len(switches),
        "switch_median_seconds": rounded(switches, 50),
        "switch_p95_seconds": rounded(switches, 95),
        "upload_median_seconds": rounded(uploads, 50),
    }


def phase_figures(runs: list[SessionRun], peak_rss_mb: float) -> dict:
    return {
        "sessions": len(runs),
        **latency_figures(runs),
        "server_peak_rss_mb": peak_rss_mb,
        "every_session_saw_its_own_result": all(run.own_result for run in runs),
        "problems": {run.case: run.problem for run in runs if run.problem},
    }


async def drive(url: str, server_pid: int, plans: list[CasePlan], chromium: str) -> dict:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            alone = phase_figures(*await run_phase(browser, url, plans[:1], server_pid))
            together = phase_figures(*await run_phase(browser, url, plans, server_pid))
        finally:
            await browser.close()
    return {"one_session": alone, "concurrent": together}


def measure(sessions: int, switches: int, data_root: str | None = None) -> dict:
    """One server; one session alone, then ``sessions`` at once, each on its own case."""
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("Debian's chromium is not installed (make browser installs it).")
    images = sorted((resolve_data_root(data_root) / "Task04_Hippocampus" / "imagesTr").glob("*.nii.gz"))
    if len(images) < sessions:
        raise SystemExit("Task04_Hippocampus is not under the data root; set SEGMENT_DATA_ROOT.")
    plans = plan_cases(images[:sessions], switches)
    with tempfile.TemporaryDirectory() as folder:
        url, server = serve(Path(folder))
        try:
            idle_mb = round(tree_rss_mb(psutil.Process(server.pid)), 1)
            phases = asyncio.run(drive(url, server.pid, plans, chromium))
        finally:
            server.terminate()
            server.wait(timeout=60)
    return {
        "switches_per_session": switches,
        "cases_distinguishable": distinguishable(plans),
        "server_idle_rss_mb": idle_mb,
        **phases,
    }


def rows(result: dict) -> list[Row]:
    def seconds(value: float | None) -> str:
        return "none" if value is None else f"{value:.3f} s"

    table = [("viewer: server RSS before any session", f"{result['server_idle_rss_mb']:,.0f} MB")]
    for key in ("one_session", "concurrent"):
        phase = result[key]
        what = f"viewer, {phase['sessions']} session{'s' if phase['sessions'] > 1 else ''}"
        own = "yes" if phase["every_session_saw_its_own_result"] else f"NO: {phase['problems']}"
        table += [
            (
                f"{what}: skip switch to overlay drawn, median / p95 ({phase['switches']} switches)",
                f"{seconds(phase['switch_median_seconds'])} / {seconds(phase['switch_p95_seconds'])}",
            ),
            (f"{what}: upload to first overlay, median", seconds(phase["upload_median_seconds"])),
            (f"{what}: server peak RSS", f"{phase['server_peak_rss_mb']:,.0f} MB"),
            (f"{what}: every session saw its own result", own),
        ]
    distinct = "yes" if result["cases_distinguishable"] else "NO: the check cannot tell sessions apart"
    return [*table, ("viewer: the cases show different numbers", distinct)]


def main() -> None:
    parser = section_parser(__doc__)
    parser.add_argument("--sessions", type=int, default=8, help="concurrent browser sessions (default 8)")
    parser.add_argument("--switches", type=int, help="skip switches per session (default 8; quick 2)")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    result = measure(args.sessions, args.switches or (2 if args.quick else 8), args.data_root)
    finish(args, result, rows)
    phases = (result["one_session"], result["concurrent"])
    if not (result["cases_distinguishable"] and all(p["every_session_saw_its_own_result"] for p in phases)):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
