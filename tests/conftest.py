"""Shared fixtures and helpers: where the real data is, small configs that train in seconds,
the ``segment`` command run as a subprocess, and free ports for servers."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from mlflow import MlflowClient

from segment.config import ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = "Task04_Hippocampus"


def store_client(uri: str) -> MlflowClient:
    """A client reading runs and registered models from ``uri`` alone: the registry URI is
    given too, since an in-process training earlier in the session sets a global one."""
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def data_root() -> Path:
    """``$SEGMENT_DATA_ROOT``, else the shared data folder beside the project."""
    return Path(os.environ.get("SEGMENT_DATA_ROOT") or ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def hippocampus_root() -> Path:
    """The data root holding Task04_Hippocampus. Missing data skips locally but fails in CI."""
    root = data_root()
    if not (root / HIPPOCAMPUS / "dataset.json").is_file():
        message = f"{HIPPOCAMPUS} not found under {root}; set SEGMENT_DATA_ROOT"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def isbi_source() -> Path:
    """The ISBI 2012 EM PNG folder. Missing data skips locally but fails in CI."""
    folder = data_root() / "ISBI2012_EM_membrane"
    if not folder.is_dir():
        message = f"the ISBI 2012 data is not at {folder} (set SEGMENT_DATA_ROOT to the shared data folder)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return folder


def load_script(name: str) -> ModuleType:
    """Import ``data_scripts/<name>.py``, which is a folder of scripts, not a package."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "data_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def tiny_hippocampus_overrides(cases: int = 8, epochs: int = 1) -> list[str]:
    """A few real cases and a narrow 3-level network: a full epoch takes about a second."""
    return [
        f"data.max_cases={cases}",
        "data.val_fraction=0.25",
        "model.levels=3",
        "model.base_channels=4",
        f"trainer.max_epochs={epochs}",
        "trainer.val_every=1",
        "trainer.batch_size=2",
        "trainer.warmup_epochs=0",
    ]


@pytest.fixture
def tiny_hippocampus_config() -> ExperimentConfig:
    return load_config(ROOT / "configs" / "hippocampus_3d.yaml", tiny_hippocampus_overrides())


def segment_command(*args: str, console_script: bool = False) -> list[str]:
    """The ``segment`` command run with this interpreter, as a subprocess sees it; with
    ``console_script``, the installed ``segment`` script itself, as a user types it."""
    if not console_script:
        return [sys.executable, "-m", "segment.cli", *args]
    executable = shutil.which("segment", path=str(Path(sys.executable).parent))
    assert executable, "the segment console script is not installed next to this Python"
    return [executable, *args]


def set_args(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def start_tiny_training(folder: Path, env: dict, runs: Path, epochs: int, **output) -> subprocess.Popen:
    """A real ``segment train`` of the tiny set-up in the background, checkpointing into ``runs``;
    ``output`` is passed to Popen (where stdout and stderr go)."""
    command = segment_command(
        "train",
        "--config",
        str(ROOT / "configs" / "hippocampus_3d.yaml"),
        "--output-dir",
        str(runs),
        "--quiet",
        *set_args(tiny_hippocampus_overrides(epochs=epochs)),
    )
    return subprocess.Popen(command, cwd=folder, env=env, **output)


def run_segment(
    *args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 300, console_script: bool = False
) -> subprocess.CompletedProcess:
    """``segment ARGS`` run to completion in ``cwd``, its output captured as text."""
    command = segment_command(*args, console_script=console_script)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def one_sentence_error(result: subprocess.CompletedProcess) -> str:
    """The one line a refused command printed on stderr; fails on a traceback or more lines."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def in_test_folder(tmp_path: Path, data_root: Path) -> dict:
    """Arguments of the engine's ``train`` for a quiet in-process run whose store and
    checkpoints stay in ``tmp_path``."""
    return {
        "data_root": data_root,
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "output_root": tmp_path / "runs",
        "progress": False,
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def resume_training(run_id: str, runs: Path, max_epochs: int, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """``segment train --resume RUN_ID`` from the checkpoints in ``runs``, up to ``max_epochs``."""
    return run_segment(
        "train", "--resume", run_id, "--output-dir", str(runs), "--quiet",
        "--set", f"trainer.max_epochs={max_epochs}", cwd=cwd, env=env,
    )
