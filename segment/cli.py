"""The ``segment`` command: thin wiring from the shell onto library calls."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from segment.config import ConfigError, load_config

app = typer.Typer(
    help="Train, compare and understand U-Nets on medical scans; every long skip is a switch.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Experiment YAML, e.g. configs/hippocampus_3d.yaml.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value, e.g. --set trainer.max_epochs=2 (repeatable)."),
]


def _print_version(value: bool) -> None:
    if value:
        from segment import __version__

        typer.echo(f"segment {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Train, compare and understand U-Nets on medical scans; every long skip is a switch."""


def fail(message: str) -> None:
    """Print one sentence to stderr and exit non-zero: the user's error, not a crash."""
    typer.secho(f"Error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


@app.command()
def describe(config: ConfigOption, overrides: SetOption = None) -> None:
    """Print the model a config builds: levels, channels, long skips and parameter count."""
    from segment.models import build_model

    try:
        experiment = load_config(config, overrides or [])
    except ConfigError as error:
        fail(str(error))
    model = build_model(experiment.model)
    spec = experiment.model
    typer.echo(f"{experiment.name}: {spec.spatial_dims}D U-Net, {spec.encoder} encoder, {spec.skip_mode} skips")
    typer.echo(f"  levels: {spec.levels}, channels per level: {list(model.encoder.out_channels)}")
    typer.echo(f"  long skips: {spec.num_skips}, skip dropout: {list(spec.skip_dropout_per_level)}")
    typer.echo(f"  parameters: {sum(p.numel() for p in model.parameters()):,}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
