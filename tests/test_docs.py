"""The documentation matches the code: generated pages are current, the CLI reference lists
what ``segment --help`` shows, the README stays short and no relative link is broken."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 200


def load_generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WIDE = {"COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}  # nothing wraps, no colour codes


@functools.cache
def help_in_process(*command: str) -> str:
    """``segment <command> --help`` as the CLI renders it, run in this process (fast)."""
    from typer.testing import CliRunner

    from segment.cli import app

    result = CliRunner().invoke(app, [*command, "--help"], env=WIDE, terminal_width=250)
    assert result.exit_code == 0, f"`segment {' '.join(command)} --help` failed: {result.output[-500:]}"
    return result.output


@functools.cache
def help_as_user_sees_it(*command: str) -> str:
    """``python -m segment.cli <command> --help`` in a process of its own, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "segment.cli", *command, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, **WIDE},
        cwd=ROOT,
        check=True,
        timeout=60,
    ).stdout


def help_rows(text: str) -> list[list[str]]:
    """The rows of the help's panels (Rich) or indented lists (plain click), split into columns.
    A row starts near the left edge; a wrapped description continues far to the right."""
    rows = []
    for line in text.splitlines():
        body = line[1:] if line.startswith("│") else line
        if line.startswith(("╭", "╰")) or not body.strip():
            continue
        indent = len(body) - len(body.lstrip())
        if 1 <= indent <= 6:
            rows.append(re.split(r"\s{2,}", body.strip("│ ").rstrip()))
    return rows


def listed_commands(text: str) -> list[str]:
    return [row[0] for row in help_rows(text) if re.fullmatch(r"[a-z][\w-]*", row[0])]


def listed_options(text: str) -> list[str]:
    """Every option name in the first columns of the help's rows (``*`` marks a required one)."""
    options = set()
    for row in help_rows(text):
        for cell in row:
            names = []
            for word in cell.replace(",", " ").replace("/", " ").split():
                if not re.fullmatch(r"-{1,2}[A-Za-z][\w-]*", word):
                    break
                names.append(word)
            if cell != "*" and not names:
                break
            options.update(names)
    return sorted(options - {"--help"})


def sections(markdown: str) -> dict[str, str]:
    """Second-level headings -> the text under them."""
    parts = re.split(r"^## (.+)$", markdown, flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_generated_pages_are_current():
    generator = load_generator()
    for path, expected in generator.expected_pages().items():
        relative = path.relative_to(ROOT)
        assert path.is_file(), f"{relative} is missing; run `make docs`."
        assert path.read_text(encoding="utf-8") == expected, (
            f"{relative} is out of date with the code (a CLI option or config field changed); "
            "run `make docs` and commit the result."
        )


def test_every_config_key_is_described():
    from segment.config import ExperimentConfig

    sections_of = [ExperimentConfig] + [
        field.annotation
        for field in ExperimentConfig.model_fields.values()
        if hasattr(field.annotation, "model_fields")
    ]
    missing = [
        f"{model.__name__}.{key}"
        for model in sections_of
        for key, field in model.model_fields.items()
        if not field.description
    ]
    assert not missing, f"Give these config fields a Field(description=...), then run `make docs`: {missing}"


def test_cli_reference_lists_what_help_shows():
    reference = sections((DOCS / "cli.md").read_text(encoding="utf-8"))
    commands = listed_commands(help_as_user_sees_it())
    assert "train" in commands, "could not read the command list from `segment --help`"
    for name in commands:
        section = reference.get(f"segment {name}")
        assert section is not None, f"docs/cli.md has no section for `segment {name}`; run `make docs`."
        for option in listed_options(help_in_process(name)):
            assert f"`{option}`" in section, (
                f"`segment {name} --help` shows {option}, docs/cli.md does not; run `make docs`."
            )


def test_reference_matches_help_in_a_real_process():
    """One command's help from a real `python -m segment.cli` process: it shows the same options
    as the in-process help above, and docs/cli.md lists them all."""
    shown = listed_options(help_as_user_sees_it("evaluate"))
    for option in ("--model", "-m", "--data", "--split", "--json"):  # the parser really reads rows
        assert option in shown
    assert shown == listed_options(help_in_process("evaluate"))
    section = sections((DOCS / "cli.md").read_text(encoding="utf-8"))["segment evaluate"]
    missing = [option for option in shown if f"`{option}`" not in section]
    assert not missing, f"`segment evaluate --help` shows {missing}, docs/cli.md does not; run `make docs`."


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it at most {README_MAX_LINES} and move detail into docs/."
    )


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown page."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", strip_code(markdown), flags=re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def strip_code(markdown: str) -> str:
    return re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(str(path.relative_to(ROOT)) for path in DOCS.glob("*.md"))]
)
def test_relative_links_resolve(page):
    path = ROOT / page
    text = path.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(re.sub(r"`[^`\n]*`", "", strip_code(text))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif (
            anchor
            and linked.suffix == ".md"
            and anchor not in heading_anchors(linked.read_text(encoding="utf-8"))
        ):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page} links to: {broken}"
