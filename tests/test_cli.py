"""The installed ``segment`` command, run as a user would run it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run_segment(*args: str) -> subprocess.CompletedProcess:
    executable = shutil.which("segment", path=str(Path(sys.executable).parent))
    assert executable, "the segment console script is not installed next to this Python"
    return subprocess.run([executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_help_lists_every_command_with_its_summary():
    import typer

    from segment.cli import app

    result = run_segment("--help")
    assert result.returncode == 0
    listed = " ".join(word for word in result.stdout.split() if word != "│")
    for name, command in typer.main.get_command(app).commands.items():
        assert f"{name} {' '.join(command.help.split()[:4])}" in listed, name


def test_describe_prints_the_default_model():
    result = run_segment("describe", "--config", "configs/hippocampus_3d.yaml")
    assert result.returncode == 0, result.stderr
    assert "channels per level: [8, 16, 32, 64, 128]" in result.stdout
    assert "long skips (finest first): 1111" in result.stdout


def test_describe_shows_which_long_skips_a_model_is_built_without():
    result = run_segment("describe", "--config", "configs/hippocampus_3d_noskip.yaml")
    assert result.returncode == 0, result.stderr
    assert "long skips (finest first): 0000" in result.stdout


def test_bad_override_exits_non_zero_with_one_line_and_no_traceback():
    result = run_segment("describe", "--config", "configs/hippocampus_3d.yaml", "--set", "model.encoder=vgg")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "model.encoder" in result.stderr


def test_one_set_takes_several_overrides_as_documented():
    result = run_segment(
        "describe", "--config", "configs/hippocampus_3d.yaml", "--set", "model.base_channels=4", "model.levels=3"
    )
    assert result.returncode == 0, result.stderr
    assert "channels per level: [4, 8, 16]" in result.stdout


def test_a_stray_word_after_set_is_refused_in_one_sentence():
    result = run_segment("describe", "--config", "configs/hippocampus_3d.yaml", "--set", "model.levels=3", "oops")
    assert result.returncode == 2
    assert "'oops'" in result.stderr and "Traceback" not in result.stderr
