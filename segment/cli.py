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
    typer.Option(
        "--set",
        help="Override config values, e.g. --set trainer.max_epochs=2 model.skip_dropout=0.3 (repeatable).",
    ),
]
# Lets one --set take several KEY=VALUE words, as in the help above: click gives an option one
# value, so the words after the first arrive as extra arguments.
TAKES_OVERRIDE_WORDS = {"allow_extra_args": True}


def _overrides(given: list[str] | None, context: typer.Context) -> list[str]:
    """The --set values plus the KEY=VALUE words that followed them; anything else is a mistake."""
    stray = [word for word in context.args if "=" not in word]
    if stray:
        fail(f"Unexpected argument {stray[0]!r}: overrides look like --set section.key=value.")
    return [*(given or []), *context.args]


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


def require_output_file(path: Path, what: str) -> None:
    """Refuse an output file that cannot be written (a folder, a missing or read-only folder)
    before the work that fills it is done."""
    if path.is_dir():
        fail(f"Cannot write {what} to {path}: it is a folder; give a file name.")
    if not path.parent.is_dir():
        fail(f"Cannot write {what} to {path}: the folder {path.parent} does not exist.")
    require_writable(path.parent, what)


def require_writable(folder: Path, what: str) -> None:
    """Refuse a read-only destination before any work is done, not after the work is lost."""
    from segment.atomic import read_only_ancestor

    if (locked := read_only_ancestor(folder.resolve())) is not None:
        fail(f"Cannot write {what} under {folder}: {locked} is read-only.")


@app.command(context_settings=TAKES_OVERRIDE_WORDS)
def describe(context: typer.Context, config: ConfigOption, overrides: SetOption = None) -> None:
    """Print the model a config builds: levels, channels, long skips and parameter count."""
    from segment.models import build_model

    overrides = _overrides(overrides, context)
    try:
        experiment = load_config(config, overrides)
    except ConfigError as error:
        fail(str(error))
    model = build_model(experiment.model)
    spec = experiment.model
    typer.echo(
        f"{experiment.name}: {spec.spatial_dims}D U-Net, {spec.encoder} encoder, {spec.skip_mode} skips"
    )
    typer.echo(f"  levels: {spec.levels}, channels per level: {list(model.encoder.out_channels)}")
    built = "".join(str(int(flag)) for flag in spec.built_skips)
    typer.echo(f"  long skips (finest first): {built}, skip dropout: {list(spec.skip_dropout_per_level)}")
    typer.echo(f"  parameters: {sum(p.numel() for p in model.parameters()):,}")


@app.command(context_settings=TAKES_OVERRIDE_WORDS)
def train(
    context: typer.Context,
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
    from segment.models import ModelLoadError
    from segment.tracking import TrackingError

    overrides = _overrides(overrides, context)
    if (config is None) == (resume is None):
        fail("Give either --config to start a run or --resume RUN_ID to continue one.")
    require_writable(output_dir, "checkpoints")
    try:
        experiment = load_config(config, overrides) if config is not None else None
        result = run_training(
            experiment,
            data_root=data_root,
            tracking_uri=tracking_uri,
            resume=resume,
            overrides_on_resume=overrides if resume else None,
            output_root=output_dir,
            device=device,
            progress=not quiet,
        )
    except (
        ConfigError,
        DataNotFoundError,
        CheckpointError,
        DeviceError,
        TrackingError,
        ModelLoadError,
    ) as error:
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
        found = tracking.find_runs(experiment)
    except tracking.TrackingError as error:
        fail(str(error))
    rows = tracking.list_runs(found)
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
    validations = tracking.cross_validations(found)
    if validations:
        typer.echo("\nCross-validations: each fold's best validation Dice, averaged over the finished folds")
    for cv in validations:
        per_label = " / ".join(f"{label} {value:.4f}" for label, value in cv["dice"].items())
        missing = sorted(set(range(cv["folds"])) - set(cv["done"]))
        unfinished = f" ({', '.join(map(str, missing))} not finished)" if missing else ""
        done = ", ".join(map(str, cv["done"]))
        typer.echo(
            f"{cv['name']} ({cv['experiment']}), folds {done} of {cv['folds']}{unfinished}: "
            f"{cv['mean_dice']:.4f} ({per_label})"
        )
        if cv["settings"]:
            typer.echo(f"  recipe: {cv['settings']}")
        typer.echo(f"  runs: {' '.join(cv['run_ids'])}")


ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Bundled model name, MLflow URI (models:/NAME@best, runs:/ID/...) or model folder.",
    ),
]
DeviceOption = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")]
ModelStoreOption = Annotated[str | None, typer.Option(help="MLflow store for models:/ and runs:/ URIs.")]
Float16Option = Annotated[
    bool, typer.Option("--float16", help="Store the weights as float16: half the size on disk.")
]


def _parse_skips(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        flags = tuple(int(flag) for flag in text.split(","))
    except ValueError:
        flags = ()
    if not flags or any(flag not in (0, 1) for flag in flags):
        fail(f"--skips {text!r}: give one 0 or 1 per long skip, finest first, e.g. 1,1,0,1.")
    return flags


def _load_members(spec: str, tracking_uri: str | None):
    from segment.models import ModelLoadError, load_members
    from segment.models.sources import resolve_model

    try:
        return load_members(resolve_model(spec, tracking_uri))
    except ModelLoadError as error:
        fail(str(error))


def _load(spec: str, tracking_uri: str | None):
    from segment.models import as_segmenter

    return as_segmenter(_load_members(spec, tracking_uri))


@app.command()
def predict(
    model: ModelOption,
    input: Annotated[
        Path, typer.Option("--input", "-i", help="A scan (.nii, .nii.gz, .nrrd, .mha) or a folder of scans.")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The mask file, or a folder for a folder of scans.")
    ],
    skips: Annotated[
        str | None, typer.Option(help="Long skips on (1) or off (0), finest first, e.g. 1,1,0,1.")
    ] = None,
    device: DeviceOption = "auto",
    tracking_uri: ModelStoreOption = None,
) -> None:
    """Segment scans: integer label masks with the input's shape, affine and orientation."""
    from segment.engine.device import DeviceError, make_runtime
    from segment.engine.predict import segment_scan
    from segment.io import ScanError, read_scan, scan_suffix, write_mask

    skip_mask = _parse_skips(skips)
    if input.is_dir():
        scans = sorted(path for path in input.iterdir() if scan_suffix(path))
        if not scans:
            fail(f"{input} holds no scans (.nii, .nii.gz, .nrrd, .mha).")
        if output.exists() and not output.is_dir():
            fail(f"{output} is a file; give a folder for the masks of a folder of scans.")
        targets = [(scan, output / scan.name) for scan in scans]
    else:
        if not input.exists():
            fail(f"{input} does not exist.")
        if output.is_dir():
            output = output / input.name
        if not scan_suffix(output):
            fail(f"{output.name}: the mask needs a scan suffix (.nii.gz, .nii, .nrrd, .mha).")
        targets = [(input, output)]
    if any(target.resolve() == source.resolve() for source, target in targets):
        fail("The masks would overwrite the scans they come from; give another --output so the scans are kept.")
    require_writable(targets[0][1].parent, "masks")
    network, config = _load(model, tracking_uri)
    try:
        runtime = make_runtime(device, config.trainer.amp, config.trainer.channels_last)
    except DeviceError as error:
        fail(str(error))
    network = runtime.prepare_model(network)
    if skip_mask is not None and len(skip_mask) != network.num_skips:
        fail(f"--skips has {len(skip_mask)} entries but {model} has {network.num_skips} long skips.")
    label_names = config.label_names
    failures = 0
    for source, target in targets:
        try:
            scan = read_scan(source)
            mask = segment_scan(network, config, scan, runtime, skip_mask, progress=len(targets) == 1)
            write_mask(mask, scan, target, label_names)
        except OSError as error:
            fail(f"Cannot write {target}: {error.strerror or error}.")
        except ScanError as error:
            if len(targets) == 1:
                fail(str(error))
            typer.secho(f"Skipped: {error}", err=True, fg=typer.colors.YELLOW)
            failures += 1
            continue
        for warning in scan.warnings:
            typer.secho(f"Warning: {warning}", err=True, fg=typer.colors.YELLOW)
        counts = ", ".join(
            f"{name} {int((mask == value).sum())}" for value, name in label_names.items() if value > 0
        )
        typer.echo(f"{target}: {counts} voxels")
    if failures:
        raise typer.Exit(code=1)


@app.command()
def evaluate(
    model: ModelOption,
    data: Annotated[Path, typer.Option(help="An MSD-layout task folder (dataset.json, imagesTr, labelsTr).")],
    split: Annotated[
        str, typer.Option(help="all: every labelled case; val: the config's validation split.")
    ] = "all",
    ablate_skips: Annotated[
        bool, typer.Option("--ablate-skips", help="Also score all skips on, each level off alone, all off.")
    ] = False,
    full_sweep: Annotated[
        bool, typer.Option("--full-sweep", help="With --ablate-skips: every combination.")
    ] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    max_cases: Annotated[int | None, typer.Option(min=1, help="Score only the first N cases.")] = None,
    nsd_tolerance: Annotated[
        float | None,
        typer.Option(
            help="NSD tolerance in the scans' spatial unit. Default: 1 for scans in mm; two of the "
            "finest voxels for scans in another unit (the ISBI EM task, in micrometres: 0.008)."
        ),
    ] = None,
    device: DeviceOption = "auto",
    tracking_uri: ModelStoreOption = None,
) -> None:
    """Dice, HD95, NSD and volume per label; optionally the skip ablation."""
    import json

    from segment.atomic import write_atomically
    from segment.data.tasks import DataNotFoundError, split_task
    from segment.engine.device import DeviceError, make_runtime
    from segment.engine.evaluate import evaluate_cases, evaluation_report, skip_settings
    from segment.io import ScanError
    from segment.models import as_segmenter, split_mismatch
    from segment.models.sources import MLFLOW_SCHEMES

    if split not in ("all", "val"):
        fail(f"--split {split!r}: use all or val.")
    if nsd_tolerance is not None and not nsd_tolerance > 0:
        fail(f"--nsd-tolerance {nsd_tolerance}: give a positive distance.")
    if json_path is not None:
        require_output_file(json_path, "the JSON report")
    members = _load_members(model, tracking_uri)
    if split == "val" and (setting := split_mismatch([member_config for _, member_config in members])):
        fail(
            f"--split val: the members of {model} were validated on different cases ({setting} "
            "differs), so each trained on cases another validates on; use --split all on held-out data."
        )
    network, config = as_segmenter(members)
    # The model's own data settings, so that --split val is exactly the split it trained on.
    data_config = config.data.model_copy(update={"task": data.name})
    try:
        runtime = make_runtime(device, config.trainer.amp, config.trainer.channels_last)
        task = split_task(data_config, data.parent, download=False)
    except (DeviceError, DataNotFoundError, ConfigError) as error:
        fail(str(error))
    if sorted(task.label_names) != sorted(config.label_names):
        fail(
            f"{model} predicts labels {sorted(config.label_names)} but {data} has labels "
            f"{sorted(task.label_names)}; evaluate a model on the task it was trained for."
        )
    cases = task.val if split == "val" else sorted(task.train + task.val, key=lambda case: case["image"])
    cases = cases[:max_cases] if max_cases else cases
    if not cases:
        fail(f"{data} has no labelled cases to score.")
    built = network.resolve_skips(None)
    settings = (
        skip_settings(built, full_sweep) if ablate_skips else [tuple(int(on) for on in built)]
    )
    try:
        results = evaluate_cases(
            runtime.prepare_model(network),
            config,
            cases,
            runtime,
            task.label_names,
            settings,
            progress=True,
            nsd_tolerance=nsd_tolerance,
        )
    except ScanError as error:
        fail(str(error))
    report = evaluation_report(model, results, ablate_skips)
    _print_report(report)
    if json_path is not None:
        write_atomically(json_path, lambda temporary: temporary.write_text(json.dumps(report, indent=2)))
        typer.echo(f"Wrote {json_path}")
    from mlflow.exceptions import MlflowException

    from segment import tracking

    run_id = tracking.source_run_id(model) if model.startswith(MLFLOW_SCHEMES) else None
    if run_id is not None:
        try:
            tracking.log_evaluation(run_id, report, split)
        except MlflowException as error:
            fail(f"The results above could not be logged to MLflow run {run_id}: {error.message.splitlines()[0]}")
        typer.echo(f"Logged the evaluation to MLflow run {run_id}.")


@app.command()
def ensemble(
    models: Annotated[
        list[str], typer.Argument(help="Two or more bundled names, MLflow model URIs or model folders.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The new ensemble's folder.")],
    float16: Float16Option = False,
    tracking_uri: ModelStoreOption = None,
) -> None:
    """Join trained models of one task into an ensemble folder: it predicts the mean of their
    softmax outputs, and `segment predict --skips` switches the same skips off in every member."""
    import torch

    from segment.models import ModelLoadError, UNetEnsemble, save_ensemble

    if len(models) < 2:
        fail("An ensemble needs at least two models.")
    if output.exists():
        fail(f"{output} already exists; give a new folder for the ensemble.")
    require_writable(output.parent, "the ensemble")
    members = [_load(spec, tracking_uri) for spec in models]
    for spec, (network, _) in zip(models, members, strict=True):
        if isinstance(network, UNetEnsemble):
            fail(f"{spec} is an ensemble already; list its members instead.")
    try:
        save_ensemble(members, output, torch.float16 if float16 else None)
    except ModelLoadError as error:
        fail(str(error))
    typer.echo(f"Wrote {output}: {len(members)} members; use it as --model {output}")


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="A bundled name, MLflow model URI or model folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The new model folder.")],
    float16: Float16Option = False,
    tracking_uri: ModelStoreOption = None,
) -> None:
    """Copy a model, or an ensemble, into a folder of its own (weights and config, nothing
    else), to ship it or use it without the MLflow store."""
    import torch

    from segment.models import ModelLoadError, export_model
    from segment.models.sources import resolve_model

    if output.exists():
        fail(f"{output} already exists; give a new folder for the model.")
    require_writable(output.parent, "the model")
    try:
        export_model(resolve_model(model, tracking_uri), output, torch.float16 if float16 else None)
    except ModelLoadError as error:
        fail(str(error))
    typer.echo(f"Wrote {output}; use it as --model {output}")


@app.command()
def report(
    experiment: Annotated[str | None, typer.Option(help="Only this experiment (task).")] = None,
    output: Annotated[Path | None, typer.Option(help="Also write the report to this Markdown file.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow store (default as for train).")] = None,
) -> None:
    """The skip study: evaluated models side by side, and each skip switched off at inference
    against the model trained without it. Reads what `segment evaluate` logged to MLflow."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from segment import tracking
    from segment.atomic import write_atomically
    from segment.report import evaluated_runs, study_markdown

    if output is not None:
        require_output_file(output, "the report")
    tracking.use_store(tracking_uri)
    try:
        runs = evaluated_runs(MlflowClient(), experiment)
    except MlflowException as error:
        fail(f"Cannot read the MLflow store: {error.message.splitlines()[0]}")
    if not runs:
        fail(
            "No evaluated runs yet: evaluate trained models first with "
            "`segment evaluate --model models:/NAME@best --data DIR --split val --ablate-skips`."
        )
    text = study_markdown(runs)
    typer.echo(text)
    if output is not None:
        write_atomically(output, lambda temporary: temporary.write_text(text))
        typer.echo(f"Wrote {output}")


@app.command(name="app")
def viewer(
    port: Annotated[int, typer.Option(help="Port to serve the viewer on.")] = 8501,
    address: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps it local.")] = "127.0.0.1",
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow store whose models it offers (default as for train).")
    ] = None,
) -> None:
    """Start the Streamlit viewer (upload a scan, switch skips, see what is lost)."""
    import os
    import sys

    from segment.tracking import resolve_tracking_uri

    # Resolved here, in the user's folder: the viewer itself runs from the repository.
    os.environ["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(tracking_uri)
    root = Path(__file__).resolve().parents[1]
    viewer_file = root / "app" / "viewer.py"
    if not viewer_file.is_file():
        fail(f"The viewer is not installed alongside the package (expected {viewer_file}).")
    # Streamlit reads .streamlit/config.toml from the working directory.
    os.chdir(root)
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(viewer_file),
        "--server.port",
        str(port),
        "--server.address",
        address,
    ]
    os.execv(sys.executable, command)


def _print_report(report: dict) -> None:
    typer.echo(
        f"{report['model']}: {report['cases']} cases, mean Dice {report['mean_dice']:.4f} "
        f"(HD95 in {report['unit']}, NSD within {report['nsd_tolerance']:g} {report['unit']})"
    )
    for name in report["dice"]:
        typer.echo(
            f"  {name:>12}: Dice {report['dice'][name]:.4f}  HD95 {report['hd95'][name]:.2f}  "
            f"NSD {report['nsd'][name]:.4f}  volume {report['volume'][name]:.4g} {report['volume_unit']}"
        )
    for row in report.get("ablation", []):
        skips = "".join(str(flag) for flag in row["skips"])
        typer.echo(
            f"  skips {skips}: mean Dice {row['mean_dice']:.4f}  "
            + "  ".join(f"NSD {n} {v:.4f}" for n, v in row["nsd"].items())
        )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
