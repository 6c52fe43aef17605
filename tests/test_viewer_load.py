"""The viewer under load, in real browsers: eight sessions at once, each uploading its own
hippocampus case and switching skips, against one server (the session driver is
benchmarks/viewer_sessions.py's)."""

from __future__ import annotations

import importlib
import os
import shutil
import sys

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.faults]
sys.path.insert(0, str(ROOT / "benchmarks"))
viewer_sessions = importlib.import_module("viewer_sessions")

SESSIONS = 8
# A session's own state (its scan, features and masks) costs far less than a copy of the
# bundled ensemble, which a model loaded per session would add; the bound lies between the two
# (docs/reliability.md has the figures).
ALLOWANCE_PER_SESSION_MB = 40


@pytest.fixture
def chromium() -> None:
    if shutil.which("chromium") is None:
        message = "Debian's chromium is not installed (make test installs it where apt-get may run)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_eight_concurrent_sessions_each_see_their_own_case_on_one_shared_model(chromium, hippocampus_root):
    result = viewer_sessions.measure(SESSIONS, switches=2, data_root=str(hippocampus_root))
    alone, together = result["one_session"], result["concurrent"]

    assert result["cases_distinguishable"], "two cases show the same numbers: the check could not fail"
    assert alone["every_session_saw_its_own_result"], alone["problems"]
    assert together["every_session_saw_its_own_result"], together["problems"]
    assert together["switches"] == SESSIONS * 2
    bound = alone["server_peak_rss_mb"] + SESSIONS * ALLOWANCE_PER_SESSION_MB
    assert together["server_peak_rss_mb"] < bound, (
        f"the server peaked at {together['server_peak_rss_mb']:.0f} MB with {SESSIONS} sessions, "
        f"{alone['server_peak_rss_mb']:.0f} MB with one: more than one model, or sessions' state not freed?"
    )
