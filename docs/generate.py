"""Rewrite the generated halves of docs/cli.md and docs/configs.md from the code.

The CLI reference is read from the Typer app itself (``segment.cli.app``), the config reference
from the pydantic models in ``segment/config/sections.py`` (each field's ``description``). Each page
keeps what is written above the marker line and has everything below it rewritten, so the
hand-written introductions survive. Nothing here names a command, option or key: a changed
flag or field needs only ``make docs`` (``python docs/generate.py``), never a change here.

``python docs/generate.py --check`` rewrites nothing and exits 1 if a page is out of date.
"""

from __future__ import annotations

import inspect
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
MARKER = "<!-- generated: do not edit below -->"

if str(ROOT) not in sys.path:  # `python docs/generate.py` from a checkout without an install
    sys.path.insert(0, str(ROOT))


# -- Markdown helpers ---------------------------------------------------------------------------


def _cell(text: object) -> str:
    """One table cell: a single line, pipes escaped."""
    return re.sub(r"\s+", " ", str(text)).strip().replace("|", "\\|")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return lines


def _paragraphs(text: str | None) -> str:
    """A docstring or help text as Markdown paragraphs: hard line breaks inside a paragraph go."""
    text = inspect.cleandoc(text or "").replace("\b", "")
    return "\n\n".join(
        " ".join(line.strip() for line in block.splitlines()) for block in re.split(r"\n\s*\n", text) if block
    )


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


# -- CLI reference ------------------------------------------------------------------------------


def _context(command: Any, name: str, parent: Any = None) -> Any:
    return command.context_class(command, info_name=name, parent=parent)


def _param_type(param: Any, context: Any) -> str:
    """The value type as ``--help`` shows it (Typer's display type, or click's type name)."""
    if getattr(param, "is_flag", False) and not getattr(param, "count", False):
        return "flag"
    display = getattr(param, "display_type", None)
    if callable(display):
        try:
            text = display(context)
        except TypeError:
            text = display()
    else:
        text = getattr(getattr(param, "type", None), "name", "") or ""
    text = str(text).strip().removeprefix("<").removesuffix(">").removesuffix(" range")
    low = getattr(param, "min", None)
    high = getattr(param, "max", None)
    if low is None and high is None:
        low = getattr(getattr(param, "type", None), "min", None)
        high = getattr(getattr(param, "type", None), "max", None)
    if low is not None:
        text += f", at least {low}"
    if high is not None:
        text += f", at most {high}"
    if getattr(param, "multiple", False):
        text += ", repeatable"
    return text


def _param_default(param: Any) -> str:
    if param.required:
        return "required"
    default = param.default
    if getattr(param, "is_flag", False):
        return "on" if default else "off"
    if callable(default):
        return "computed"
    if default is None or default == () or default == [] or repr(default).startswith("<"):
        return ""
    if isinstance(default, list | tuple):
        return _code(" ".join(str(value) for value in default))
    return _code(str(default))


def _param_names(param: Any) -> str:
    if param.param_type_name == "argument":
        name = param.name.upper() + ("..." if param.nargs == -1 else "")
        return f"`{name}` (argument)"
    return ", ".join(_code(name) for name in (*param.opts, *param.secondary_opts))


def _params_table(command: Any, context: Any) -> list[str]:
    params = [param for param in command.params if not getattr(param, "hidden", False)]
    if not params:
        return ["No options."]
    rows = [
        (_param_names(p), _param_type(p, context), _param_default(p), getattr(p, "help", None) or "")
        for p in params
    ]
    return _table(("option", "type", "default", "description"), rows)


def _first_sentence(text: str) -> str:
    paragraph = _paragraphs(text).split("\n\n")[0]
    return re.split(r"(?<=[.;])\s", paragraph, maxsplit=1)[0].rstrip(".;")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return "#" + text.replace(" ", "-")


def cli_reference() -> str:
    """Every command of ``segment``, in the order ``segment --help`` lists them."""
    import typer

    from segment.cli import app

    group = typer.main.get_command(app)
    root = _context(group, "segment")
    commands = [
        (name, command)
        for name in group.list_commands(root)
        if (command := group.get_command(root, name)) is not None and not command.hidden
    ]
    lines = [
        "## segment",
        "",
        "```",
        "segment " + " ".join(group.collect_usage_pieces(root)),
        "```",
        "",
        _paragraphs(group.help),
        "",
        *_params_table(group, root),
        "",
        *_table(
            ("command", "what it does"),
            [
                (f"[`{name}`]({_anchor(f'segment {name}')})", _first_sentence(command.help or ""))
                for name, command in commands
            ],
        ),
    ]
    for name, command in commands:
        context = _context(command, name, parent=root)
        usage = " ".join(["segment", name, *command.collect_usage_pieces(context)])
        lines += ["", f"## segment {name}", "", "```", usage, "```", "", _paragraphs(command.help)]
        if command.epilog:
            lines += ["", _paragraphs(command.epilog)]
        lines += ["", *_params_table(command, context)]
    return "\n".join(lines) + "\n"


# -- Config reference ---------------------------------------------------------------------------


def _yaml(value: Any) -> str:
    """A default as it would be written in a config file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_yaml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml(key)}: {_yaml(item)}" for key, item in value.items()) + "}"
    return str(value)


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "/".join(str(value) for value in args)
    if origin in (typing.Union, types.UnionType):
        named = [_type_name(arg) for arg in args if arg is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return "[" + ", ".join(_type_name(arg) for arg in args) + "]"
    if origin in (dict, typing.Mapping):
        return f"mapping {_type_name(args[0])} -> {_type_name(args[1])}"
    if origin in (list, set, frozenset):
        return f"list of {_type_name(args[0])}"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="))


def _constraints(field: Any) -> str:
    found = []
    for item in field.metadata:
        for attribute, symbol in _BOUNDS:
            value = getattr(item, attribute, None)
            if value is not None:
                found.append(f"{symbol} {value}")
    return ", ".join(found)


def _aliases(field: Any, prefix: str, key: str) -> str:
    choices = getattr(field.validation_alias, "choices", None) or []
    others = [choice for choice in choices if isinstance(choice, str) and choice != key]
    return "".join(f" Also read as `{prefix}{other}`." for other in others)


def _section_type(field: Any) -> type | None:
    from pydantic import BaseModel

    annotation = field.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _fields_table(model: type, prefix: str) -> list[str]:
    from pydantic_core import PydanticUndefined

    rows = []
    for key, field in model.model_fields.items():
        section = _section_type(field)
        kind = _type_name(field.annotation) if section is None else "section"
        if (bounds := _constraints(field)) != "":
            kind += f", {bounds}"
        if section is not None:
            default = f"[see below]({_anchor(f'{prefix}{key}')})"
        elif field.default is PydanticUndefined and field.default_factory is None:
            default = "required"
        else:
            default = _code(_yaml(field.get_default(call_default_factory=True)))
        description = (field.description or "") + _aliases(field, prefix, key)
        rows.append((f"`{prefix}{key}`", kind, default, description))
    return _table(("key", "type", "default", "description"), rows)


def config_reference() -> str:
    """The top-level keys of an experiment, then each section's keys, in the order of the code."""
    from segment.config import ExperimentConfig

    lines = [
        "## Top level",
        "",
        _paragraphs(ExperimentConfig.__doc__),
        "",
        *_fields_table(ExperimentConfig, ""),
    ]
    for key, field in ExperimentConfig.model_fields.items():
        section = _section_type(field)
        if section is not None:
            lines += [
                "",
                f"## {key}",
                "",
                _paragraphs(section.__doc__),
                "",
                *_fields_table(section, f"{key}."),
            ]
    return "\n".join(lines) + "\n"


# -- Pages --------------------------------------------------------------------------------------

PAGES: dict[str, tuple[Callable[[], str], str]] = {
    "cli.md": (
        cli_reference,
        "# CLI reference\n\nEvery command of `segment`, generated from the CLI itself.",
    ),
    "configs.md": (config_reference, "# Configs\n\nEvery config key, generated from `segment/config/sections.py`."),
}


def render(current: str | None, generated: str, default_intro: str) -> str:
    """``current``'s hand-written part (up to and including the marker), then ``generated``."""
    if current is not None and MARKER in current:
        intro = current[: current.index(MARKER)].rstrip("\n")
    else:
        intro = default_intro
    return f"{intro}\n\n{MARKER}\n\n{generated}"


def expected_pages() -> dict[Path, str]:
    """Each generated page as ``make docs`` would write it now."""
    pages = {}
    for name, (generate, default_intro) in PAGES.items():
        path = DOCS / name
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        pages[path] = render(current, generate(), default_intro)
    return pages


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    stale = []
    for path, text in expected_pages().items():
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not check:
            path.write_text(text, encoding="utf-8")
    if check and stale:
        print(f"Out of date: {', '.join(map(str, stale))}; run `make docs`.", file=sys.stderr)
        return 1
    for path in [] if check else stale:
        print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
