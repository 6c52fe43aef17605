"""Security: files from elsewhere never run code, servers stay local, uploads are capped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import tomllib
import torch
from conftest import ROOT, free_port

from segment.models import ModelLoadError, load_model
from segment.models.serialization import CONFIG_FILE, WEIGHTS_FILE
from segment.models.sources import bundled_models
from segment.training.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint
from segment.workflows.viewer import viewer_command


class CodeOnUnpickle:
    """Unpickling this runs a shell command that creates ``marker``: what a hostile file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_carries_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"state": {}, "model": CodeOnUnpickle(marker)}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_a_model_folder_whose_weights_are_a_pickle_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "code_ran"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text((bundled_models()["isbi2012_2d"] / CONFIG_FILE).read_text())
    torch.save(CodeOnUnpickle(marker), folder / WEIGHTS_FILE)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(folder)
    assert not marker.exists()


def test_no_source_file_unpickles():
    """Every load in the code base is safetensors or ``torch.load(weights_only=True)``."""
    unsafe = re.compile(r"\bpickle\.loads?\(|\bjoblib\.load\(|mlflow\.pytorch\.load_model|torch\.load\((?![^)]*weights_only=True)")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("segment", "app", "data_scripts")
        for path in (ROOT / folder).rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if unsafe.search(line)
    ]
    assert offenders == []


def listening_addresses(port: int, timeout: float = 120) -> set[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {
            c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port == port
        }
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"nothing listened on port {port} within {timeout} s")


@pytest.mark.slow
def test_the_viewer_server_listens_on_localhost_only(tmp_path):
    port = free_port()
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "segment.cli", "app", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_the_mlflow_ui_listens_on_localhost_only(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        ["make", "--no-print-directory", "mlflow-ui", f"MLFLOW_PORT={port}", f"TRACKING_URI=sqlite:///{tmp_path / 'm.db'}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_segment_app_serves_with_the_projects_streamlit_settings_from_any_folder():
    """Streamlit reads .streamlit/config.toml only in its working folder, so `segment app` passes
    every setting of it (the upload cap, the local address) as a flag."""
    settings = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    command = viewer_command()
    flags = dict(zip(command[5::2], command[6::2], strict=True))
    assert flags["--server.maxUploadSize"] == "500" and flags["--server.address"] == "127.0.0.1"
    for section, values in settings.items():
        for key, value in values.items():
            assert flags[f"--{section}.{key}"] == (str(value).lower() if isinstance(value, bool) else str(value))
