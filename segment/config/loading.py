"""Reading an experiment config: YAML files that may extend one another, ``--set key=value``
overrides, validation into :class:`ExperimentConfig`, and the resolved config back as YAML.

Errors are raised as :class:`ConfigError` carrying one sentence that names the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from segment.config.sections import ExperimentConfig
from segment.errors import SegmentError


class ConfigError(SegmentError):
    """A configuration the user wrote cannot be used; the message says which key and why."""


def _format_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{where}'; check its spelling against the documented keys."
    message = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"{source}: {where}: {message}{shown}."


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted_key}: '{part}' is a value, not a section.")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides; values are parsed as YAML (``0.3``, ``[8,16]``)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {override!r}: expected key=value, e.g. trainer.max_epochs=2.")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def build_config(tree: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a plain dictionary into an :class:`ExperimentConfig`."""
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` laid over it: sections merge key by key, values replace."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One YAML file as a dictionary, laid over the file it ``extends`` (a path relative to it)."""
    if not path.is_file():
        named = f"{chain[-1]} extends {path}, which" if chain else f"Config file {path}"
        raise ConfigError(f"{named} does not exist; pick one from configs/.")
    if path.resolve() in {link.resolve() for link in chain}:
        raise ConfigError(f"Configs extend each other in a loop: {' -> '.join(map(str, (*chain, path)))}.")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error.__class__.__name__}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; a config is YAML.") from None
    except OSError as error:
        raise ConfigError(f"Cannot read {path}: {error.strerror or error}.") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not a {type(tree).__name__}.")
    # A recipe is a variant of another: its name is its own, everything else is inherited.
    tree.setdefault("name", path.stem)
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must name one config file, e.g. extends: hippocampus_3d.yaml.")
    inherited = _read_tree(path.parent / parent, (*chain, path))
    inherited.pop("name")
    return _merge(inherited, tree)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file (and the files it extends), apply overrides and validate it."""
    path = Path(path)
    return build_config(apply_overrides(_read_tree(path), overrides or []), source=str(path))


def config_to_yaml(config: ExperimentConfig) -> str:
    """The resolved configuration as YAML, readable by :func:`load_config`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
