"""``pip install .`` into a fresh virtual environment outside the checkout: the installed
``segment`` predicts and serves the viewer (``segment.app``) from any folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, free_port
from setuptools import find_packages

CASE = "hippocampus_001"
# What a non-editable build reads from the checkout (pyproject's readme is README.md).
SOURCES = ("pyproject.toml", "README.md", "segment", "app")

pytestmark = pytest.mark.slow


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that would put the checkout on sys.path."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "MLFLOW_TRACKING_URI")
    }
    return env | extra


def run(command: list[str], cwd: Path, timeout: float = 120, **extra: str) -> str:
    done = subprocess.run(
        command, cwd=cwd, env=clean_env(**extra), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{command} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A new virtual environment with segment installed non-editably; its other dependencies
    come from this interpreter's site-packages through a .pth file (torch etc. are not copied)."""
    base = tmp_path_factory.mktemp("install")
    # Built from a copy: an in-tree build would leave build/ in the checkout.
    source = base / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    env = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(env)], cwd=base)
    python = env / "bin" / "python"
    purelib = Path(
        run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base).strip()
    )
    # Only .pth files in a site directory itself run, so the project venv's editable finder for
    # the checkout (its __editable__ .pth) stays off here; the new venv's own segment comes first.
    (purelib / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--force-reinstall",
            str(source),
        ],
        cwd=base,
        timeout=300,
    )
    shutil.rmtree(source)
    return env


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """The user's folder: neither the checkout nor the venv."""
    folder = tmp_path / "user"
    folder.mkdir()
    return folder


def test_installed_package_is_its_own(venv, elsewhere):
    probe = (
        "import json, sys, segment, segment.app, segment.app.rendering, segment.pretrained\n"
        "print(json.dumps({'segment': segment.__file__, 'app': segment.app.__file__, 'path': sys.path}))"
    )
    found = json.loads(run([str(venv / "bin" / "python"), "-c", probe], elsewhere))
    for name in ("segment", "app"):
        assert Path(found[name]).resolve().is_relative_to(venv.resolve()), found[name]
    checkout = {ROOT, ROOT / "app", ROOT / "segment"}
    assert not [entry for entry in found["path"] if entry and Path(entry).resolve() in checkout]
    # Every package and viewer module of the checkout is installed (pyproject lists app/'s modules).
    package = Path(found["segment"]).parent
    installed = {
        ".".join(("segment", *init.parent.relative_to(package).parts))
        for init in package.rglob("__init__.py")
    }
    expected = set(find_packages(ROOT, include=["segment*"])) | {"segment.app"}
    assert expected <= installed, f"packages not installed: {sorted(expected - installed)}"
    missing = sorted(
        f"segment.app.{module.stem}"
        for module in (ROOT / "app").glob("*.py")
        if not (package / "app" / module.name).is_file()
    )
    assert not missing, f"add {missing} to [tool.setuptools] py-modules in pyproject.toml"


def test_installed_predict_from_another_folder(venv, elsewhere, hippocampus_root):
    scan = hippocampus_root / "Task04_Hippocampus" / "imagesTr" / f"{CASE}.nii.gz"
    run(
        [
            str(venv / "bin" / "segment"),
            "predict",
            "--model",
            "hippocampus_3d",
            "--input",
            str(scan),
            "--output",
            "mask.nii.gz",
        ],
        elsewhere,
        MLFLOW_TRACKING_URI=f"sqlite:///{elsewhere / 'mlflow.db'}",
    )
    mask = np.asanyarray(nib.load(elsewhere / "mask.nii.gz").dataobj)
    assert mask.shape == nib.load(scan).shape
    assert set(np.unique(mask).tolist()) <= {0, 1, 2}
    assert (mask > 0).sum() > 0


def test_installed_app_from_another_folder(venv, elsewhere):
    port = free_port()
    log = elsewhere / "app.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [str(venv / "bin" / "segment"), "app", "--port", str(port)],
            cwd=elsewhere,
            env=clean_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 45
        answer = None
        while answer != "ok":
            assert server.poll() is None, f"segment app exited ({server.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no health answer within 45 s:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                    answer = reply.read().decode()
            except OSError:
                time.sleep(0.2)
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.status == 200
            assert 'id="root"' in reply.read().decode()
        # `segment app` execs Streamlit in the same process: it runs the installed viewer with
        # the settings as flags, and the store resolved in the user's folder.
        argv = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode().split("\0")
        viewer = Path(argv[argv.index("run") + 1])
        assert viewer.name == "viewer.py"
        assert viewer.resolve().is_relative_to(venv.resolve()), argv
        flags = dict(zip(argv[argv.index("run") + 2 :: 2], argv[argv.index("run") + 3 :: 2], strict=False))
        assert flags["--server.maxUploadSize"] == "500"
        assert flags["--server.headless"] == "true"
        assert flags["--server.address"] == "127.0.0.1"
        environ = Path(f"/proc/{server.pid}/environ").read_bytes().decode().split("\0")
        assert f"MLFLOW_TRACKING_URI=sqlite:///{elsewhere / 'mlflow.db'}" in environ
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    """End the process group started for ``server`` (Streamlit and anything it spawned)."""
    for sent in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sent)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=15)
            break
        except subprocess.TimeoutExpired:
            continue
    server.wait(timeout=15)
