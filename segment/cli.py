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

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Experiment YAML, e.g. configs/hippocampus_3d.yaml.")
]
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
    typer.echo(
        f"{experiment.name}: {spec.spatial_dims}D U-Net, {spec.encoder} encoder, {spec.skip_mode} skips"
    )
    typer.echo(f"  levels: {spec.levels}, channels per level: {list(model.encoder.out_channels)}")
    typer.echo(f"  long skips: {spec.num_skips}, skip dropout: {list(spec.skip_dropout_per_level)}")
    typer.echo(f"  parameters: {sum(p.numel() for p in model.parameters()):,}")


@app.command()
def train(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Experiment YAML, e.g. configs/hippocampus_3d.yaml.")
    ] = None,
    overrides: SetOption = None,
    data_root: Annotated[
        Path | None,
        typer.Option(help="Folder holding MSD task folders (default: $SEGMENT_DATA_ROOT, else ./data)."),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."),
    ] = None,
    resume: Annotated[
        str | None, typer.Option(help="MLflow run id to continue from its last checkpoint, in the same run.")
    ] = None,
    output_dir: Annotated[Path, typer.Option(help="Where checkpoints and best models are written.")] = Path(
        "runs"
    ),
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Train a U-Net from a config; every run is tracked in MLflow. Runs under torchrun too."""
    from segment.data.tasks import DataNotFoundError
    from segment.engine.checkpoint import CheckpointError
    from segment.engine.device import DeviceError
    from segment.engine.train import TrainingInterrupted
    from segment.engine.train import train as run_training
    from segment.tracking import TrackingError

    if (config is None) == (resume is None):
        fail("Give either --config to start a run or --resume RUN_ID to continue one.")
    try:
        experiment = load_config(config, overrides or []) if config is not None else None
        result = run_training(
            experiment,
            data_root=data_root,
            tracking_uri=tracking_uri,
            resume=resume,
            overrides_on_resume=overrides or [] if resume else None,
            output_root=output_dir,
            device=device,
            progress=not quiet,
        )
    except (ConfigError, DataNotFoundError, CheckpointError, DeviceError, TrackingError) as error:
        fail(str(error))
    except TrainingInterrupted as stopped:
        typer.secho(str(stopped), err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(code=130) from None
    if not result.is_main_process:
        return  # under torchrun the first process prints the summary
    per_class = ", ".join(f"{name} {value:.4f}" for name, value in result.best_dice.items())
    typer.echo(
        f"Finished run {result.run_id}: {result.stop_reason}, {result.epochs_done} epochs in {result.wall_seconds / 60:.1f} min."
    )
    typer.echo(
        f"Best validation Dice {result.best_mean_dice:.4f} at epoch {result.best_epoch} ({per_class})."
    )
    typer.echo(f"Best model: {result.model_dir} (registered as version {result.model_version}).")


@app.command()
def runs(
    experiment: Annotated[
        str | None, typer.Option(help="Only this experiment (task), e.g. Task04_Hippocampus.")
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow store (default as for train).")] = None,
) -> None:
    """List tracked runs with their key metrics, newest first."""
    from segment import tracking

    tracking.use_store(tracking_uri)
    try:
        rows = tracking.list_runs(experiment)
    except tracking.TrackingError as error:
        fail(str(error))
    if not rows:
        typer.echo("No runs yet: start one with `segment train --config configs/hippocampus_3d.yaml`.")
        return
    header = f"{'run id':32}  {'experiment':20}  {'name':24}  {'status':8}  {'epochs':>6}  {'best Dice':>9}  {'minutes':>7}  device"
    typer.echo(header)
    for row in rows:
        dice = "-" if row["best_val_mean_dice"] is None else f"{row['best_val_mean_dice']:.4f}"
        minutes = "-" if row["minutes"] is None else f"{row['minutes']:.1f}"
        typer.echo(
            f"{row['run_id']:32}  {row['experiment'][:20]:20}  {(row['name'] or '')[:24]:24}  {row['status']:8}  "
            f"{row['epochs']:>6}  {dice:>9}  {minutes:>7}  {row['device']}"
        )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
