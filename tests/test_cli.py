"""The installed ``segment`` command, run as a user would run it."""

from functools import partial

import pytest
from conftest import run_segment

pytestmark = pytest.mark.slow

# The console script pip installed, not `python -m segment.cli`.
segment = partial(run_segment, console_script=True, timeout=120)


def test_help_lists_every_command_with_its_summary():
    import typer

    from segment.cli import app

    result = segment("--help")
    assert result.returncode == 0
    listed = " ".join(word for word in result.stdout.split() if word != "│")
    for name, command in typer.main.get_command(app).commands.items():
        assert f"{name} {' '.join(command.help.split()[:4])}" in listed, name


def test_describe_prints_the_default_model():
    result = segment("describe", "--config", "configs/hippocampus_3d.yaml")
    assert result.returncode == 0, result.stderr
    assert "channels per level: [8, 16, 32, 64, 128]" in result.stdout
    assert "long skips (finest first): 1111" in result.stdout


def test_describe_shows_which_long_skips_a_model_is_built_without():
    result = segment("describe", "--config", "configs/hippocampus_3d_noskip.yaml")
    assert result.returncode == 0, result.stderr
    assert "long skips (finest first): 0000" in result.stdout


def test_bad_override_exits_non_zero_with_one_line_and_no_traceback():
    result = segment("describe", "--config", "configs/hippocampus_3d.yaml", "--set", "model.encoder=vgg")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "model.encoder" in result.stderr


def test_one_set_takes_several_overrides_as_documented():
    result = segment(
        "describe", "--config", "configs/hippocampus_3d.yaml", "--set", "model.base_channels=4", "model.levels=3"
    )
    assert result.returncode == 0, result.stderr
    assert "channels per level: [4, 8, 16]" in result.stdout


def test_a_stray_word_after_set_is_refused_in_one_sentence():
    result = segment("describe", "--config", "configs/hippocampus_3d.yaml", "--set", "model.levels=3", "oops")
    assert result.returncode == 2
    assert "'oops'" in result.stderr and "Traceback" not in result.stderr
