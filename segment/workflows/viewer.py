"""``serve_viewer``: the Streamlit viewer, started from the installed package ``segment.app``
(``app/`` in the repository), so it starts the same from any folder."""

from __future__ import annotations

import importlib.resources
import os
import sys
from pathlib import Path

from segment.errors import InputError
from segment.tracking.store import resolve_tracking_uri

# What .streamlit/config.toml sets for `streamlit run` in the repository; Streamlit reads that
# file from the working folder only, so the installed viewer gets the settings as flags.
STREAMLIT_SETTINGS = {
    "server.headless": "true",
    "server.maxUploadSize": "500",
    "browser.gatherUsageStats": "false",
    "client.toolbarMode": "minimal",
}


def viewer_command(port: int = 8501, address: str = "127.0.0.1") -> list[str]:
    """The ``python -m streamlit run`` command line that serves the installed viewer."""
    try:
        viewer_file = Path(str(importlib.resources.files("segment.app") / "viewer.py"))
    except ModuleNotFoundError:
        viewer_file = None
    if viewer_file is None or not viewer_file.is_file():
        raise InputError("The viewer (package segment.app) is not installed; reinstall the segment package.")
    settings = {**STREAMLIT_SETTINGS, "server.port": str(port), "server.address": address}
    flags = [word for key, value in settings.items() for word in (f"--{key}", value)]
    return [sys.executable, "-m", "streamlit", "run", str(viewer_file), *flags]


def serve_viewer(port: int = 8501, address: str = "127.0.0.1", *, tracking_uri: str | None = None) -> None:
    """Replace this process with the viewer's server on ``address:port``; it offers the models
    of the MLflow store ``tracking_uri`` (resolved here, in the caller's folder, so that a
    relative store means the same as for training)."""
    command = viewer_command(port, address)
    os.environ["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(tracking_uri)
    os.execv(sys.executable, command)
