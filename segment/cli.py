"""The ``segment`` command: parse the shell's words, call a workflow, print its result.

Every command is an adapter onto :mod:`segment.workflows`; a :class:`SegmentError` from any of
them is turned into its one sentence and exit code 2 in one place, :class:`_Commands`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from segment.errors import InputError, SegmentError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_SOME_SKIPPED = 1


class _Commands(TyperGroup):
    """The one place where a user's error becomes one sentence on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SegmentError as error:
            typer.secho(f"Error: {error}", err=True, fg=typer.colors.RED)
            raise typer.Exit(code=EXIT_USER_ERROR) from None


app = typer.Typer(
    cls=_Commands,
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
ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Bundled model name, MLflow URI (models:/NAME@best, runs:/ID/...) or model folder.",
    ),
]
DeviceOption = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")]
DataRootOption = Annotated[
    Path | None,
    typer.Option(help="Folder holding MSD task folders (default: $SEGMENT_DATA_ROOT, else ./data)."),
]
KeepLargestOption = Annotated[
    bool, typer.Option("--keep-largest", help="Keep only the largest connected component of each label.")
]
MinSizeOption = Annotated[
    float | None,
    typer.Option(
        "--min-size", help="Remove connected components smaller than this volume (mm³ for scans in mm)."
    ),
]
StoreOption = Annotated[
    str | None, typer.Option(help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")
]
Float16Option = Annotated[
    bool, typer.Option("--float16", help="Store the weights as float16: half the size on disk.")
]
# Lets one --set take several KEY=VALUE words, as in the help above: click gives an option one
# value, so the words after the first arrive as extra arguments.
TAKES_OVERRIDE_WORDS = {"allow_extra_args": True}


def _overrides(given: list[str] | None, context: typer.Context) -> list[str]:
    """The --set values plus the KEY=VALUE words that followed them; anything else is a mistake."""
    stray = [word for word in context.args if "=" not in word]
    if stray:
        raise InputError(f"Unexpected argument {stray[0]!r}: overrides look like --set section.key=value.")
    return [*(given or []), *context.args]


def _postprocessing(keep_largest: bool, min_size: float | None):
    from segment.engine.postprocessing import PostProcessing

    steps = PostProcessing(keep_largest, min_size)
    return steps if steps.enabled else None


def _skip_mask(text: str | None) -> tuple[int, ...] | None:
    """``1,1,0,1`` -> (1, 1, 0, 1)."""
    if text is None:
        return None
    try:
        flags = tuple(int(flag) for flag in text.split(","))
    except ValueError:
        flags = ()
    if not flags or any(flag not in (0, 1) for flag in flags):
        raise InputError(f"--skip-mask {text!r}: give one 0 or 1 per long skip, finest first, e.g. 1,1,0,1.")
    return flags


def _warn(message: str) -> None:
    typer.secho(message, err=True, fg=typer.colors.YELLOW)


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


@app.command(context_settings=TAKES_OVERRIDE_WORDS)
def describe(context: typer.Context, config: ConfigOption, overrides: SetOption = None) -> None:
    """Print the model a config builds: levels, channels, long skips and parameter count."""
    from segment import workflows

    typer.echo(workflows.describe(config, _overrides(overrides, context)).to_text())


@app.command(context_settings=TAKES_OVERRIDE_WORDS)
def train(
    context: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Experiment YAML, e.g. configs/hippocampus_3d.yaml.")
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="Plan a config for this task (a name under the data root, or a task folder) and train it."),
    ] = None,
    overrides: SetOption = None,
    data_root: DataRootOption = None,
    tracking_uri: StoreOption = None,
    resume: Annotated[
        str | None, typer.Option(help="MLflow run id to continue from its last checkpoint, in the same run.")
    ] = None,
    output_dir: Annotated[Path, typer.Option(help="Where checkpoints and best models are written.")] = Path(
        "runs"
    ),
    device: DeviceOption = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Train a U-Net from a config, or from a plan made on the fly for --task; every run is
    tracked in MLflow. Runs under torchrun too."""
    from segment import reporting, workflows
    from segment.workflows.training import TrainingInterrupted

    overrides = _overrides(overrides, context)
    if sum(given is not None for given in (config, task, resume)) != 1:
        raise InputError(
            "Give one of --config or --task to start a run, or --resume RUN_ID to continue one."
        )
    if task is not None:
        folder, data_root = workflows.planning.task_location(task, data_root)
        config = workflows.plan(folder, device=device, progress=not quiet).config
    where = {"data_root": data_root, "tracking_uri": tracking_uri, "output_dir": output_dir}
    try:
        if resume is not None:
            result = workflows.resume(resume, overrides, **where, device=device, progress=not quiet)
        else:
            result = workflows.train(config, overrides, **where, device=device, progress=not quiet)
    except TrainingInterrupted as stopped:
        if stopped.is_reporting_process:  # under torchrun one process says why the job stopped
            _warn(str(stopped))
        raise typer.Exit(code=EXIT_INTERRUPTED) from None
    if result.is_main_process:  # under torchrun the first process prints the summary
        typer.echo(reporting.training_summary(result))


@app.command()
def plan(
    task: Annotated[str, typer.Argument(help="A task name under the data root (Task05_Prostate) or a task folder.")],
    data_root: DataRootOption = None,
    device: Annotated[str, typer.Option(help="Plan for auto (CUDA when present), cpu or cuda.")] = "auto",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the config here (else it is printed).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Plan a config from a task's own data (spacing, 2D/3D, patch, levels, pooling per axis,
    channels, normalisation, mirroring), each value commented with why; `segment train
    --config` takes it unchanged."""
    from segment import workflows

    planned = workflows.plan(task, data_root=data_root, device=device, output=output, progress=not quiet)
    typer.echo(f"Wrote {output}." if output is not None else planned.to_yaml().rstrip())


@app.command()
def runs(
    experiment: Annotated[
        str | None, typer.Option(help="Only this experiment (task), e.g. Task04_Hippocampus.")
    ] = None,
    tracking_uri: StoreOption = None,
) -> None:
    """List tracked runs with their key metrics, newest first, and the cross-validations."""
    from segment import workflows

    typer.echo(workflows.runs(experiment, tracking_uri=tracking_uri).to_text())


@app.command()
def predict(
    model: ModelOption,
    input: Annotated[
        Path,
        typer.Option(
            "--input", "-i", help="A scan (.nii, .nii.gz, .nrrd, .mha), a folder of scans, a folder of one DICOM series, or a .zip of one."
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The mask file, or a folder for a folder of scans.")
    ],
    skip_mask: Annotated[
        str | None,
        typer.Option("--skip-mask", help="Long skips on (1) or off (0), level 1 (finest) first, e.g. 1,1,0,1."),
    ] = None,
    keep_largest: KeepLargestOption = False,
    min_size: MinSizeOption = None,
    probabilities: Annotated[
        Path | None,
        typer.Option(
            help="Also write the mean softmax here: a NIfTI, one channel per label (a folder "
            "for a folder of scans)."
        ),
    ] = None,
    uncertainty: Annotated[
        Path | None,
        typer.Option(
            help="Also write per-voxel uncertainty here: entropy, and the disagreement of an "
            "ensemble's members or of skip settings drawn with the model's skip dropout."
        ),
    ] = None,
    samples: Annotated[
        int, typer.Option(help="Skip settings drawn for --probabilities/--uncertainty of a skip-dropout model.")
    ] = 8,
    output_format: Annotated[
        str,
        typer.Option(
            help="nifti: a mask in the --output file's format (.nii.gz, .nrrd, .mha); dicom-seg: for a "
            "DICOM series folder, a DICOM SEG (.dcm) referencing the series."
        ),
    ] = "nifti",
    device: DeviceOption = "auto",
    tracking_uri: StoreOption = None,
) -> None:
    """Segment scans: integer label masks with the input's shape, affine and orientation."""
    from segment import reporting, workflows

    result = workflows.predict(
        model,
        input,
        output,
        _skip_mask(skip_mask),
        postprocessing=_postprocessing(keep_largest, min_size),
        probabilities=probabilities,
        uncertainty=uncertainty,
        samples=samples,
        output_format=output_format,
        device=device,
        tracking_uri=tracking_uri,
    )
    for written in result.masks:
        for warning in written.warnings:
            _warn(f"Warning: {warning}")
        typer.echo(reporting.prediction_line(written))
    for reason in result.skipped:
        _warn(f"Skipped: {reason}")
    if result.skipped:
        raise typer.Exit(code=EXIT_SOME_SKIPPED)


@app.command()
def evaluate(
    model: ModelOption,
    data: Annotated[Path, typer.Option(help="An MSD-layout task folder (dataset.json, imagesTr, labelsTr).")],
    split: Annotated[
        str, typer.Option(help="all: every labelled case; val: the model's own validation split.")
    ] = "all",
    ablate_skips: Annotated[
        bool,
        typer.Option("--ablate-skips", help="Also score each long skip switched off alone, and all off."),
    ] = False,
    full_sweep: Annotated[
        bool, typer.Option("--full-sweep", help="With --ablate-skips: every combination of skip masks.")
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
    keep_largest: KeepLargestOption = False,
    min_size: MinSizeOption = None,
    device: DeviceOption = "auto",
    tracking_uri: StoreOption = None,
) -> None:
    """Dice, HD95, NSD and volume per label; optionally the skip ablation, and each
    post-processing step (--keep-largest, --min-size) scored beside the raw masks. A model from
    MLflow gets the results logged to the run that trained it."""
    from segment import reporting, workflows
    from segment.atomic import require_output_file

    if full_sweep and not ablate_skips:
        raise InputError("--full-sweep sweeps the skip masks of an ablation; give --ablate-skips too.")
    if json_path is not None:
        require_output_file(json_path, "the JSON report")
    options = {
        "max_cases": max_cases,
        "nsd_tolerance": nsd_tolerance,
        "postprocessing": _postprocessing(keep_largest, min_size),
        "device": device,
        "tracking_uri": tracking_uri,
    }
    if ablate_skips:
        report = workflows.ablate(model, data, split, full_sweep=full_sweep, **options)
    else:
        report = workflows.evaluate(model, data, split, **options)
    typer.echo(reporting.evaluation_text(report))
    if json_path is not None:
        typer.echo(f"Wrote {report.write_json(json_path)}")
    if report.logging_error is not None:
        raise InputError(f"The results above were not logged: {report.logging_error}")
    if report.logged_to_run is not None:
        typer.echo(f"Logged the evaluation to MLflow run {report.logged_to_run}.")


@app.command()
def ensemble(
    models: Annotated[
        list[str], typer.Argument(help="Two or more bundled names, MLflow model URIs or model folders.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The new ensemble's folder.")],
    float16: Float16Option = False,
    tracking_uri: StoreOption = None,
) -> None:
    """Join trained models of one task into an ensemble folder: it predicts the mean of their
    softmax outputs, and `segment predict --skip-mask` switches the same skips off in every member."""
    from segment import workflows

    written = workflows.ensemble(models, output, float16=float16, tracking_uri=tracking_uri)
    typer.echo(f"Wrote {written}: {len(models)} members; use it as --model {written}")


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="A bundled name, MLflow model URI or model folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The new model folder, or the graph file.")],
    format: Annotated[
        str,
        typer.Option(
            help="folder: weights and config; onnx or torchscript: one graph file whose inputs are "
            "the prepared volume and the skip mask."
        ),
    ] = "folder",
    float16: Float16Option = False,
    tracking_uri: StoreOption = None,
) -> None:
    """Copy a model, or an ensemble, into a folder of its own (weights and config, nothing
    else), to ship it or use it without the MLflow store; or export it as one ONNX or
    TorchScript graph with the skip mask as an input."""
    from segment import workflows

    written = workflows.export(model, output, format=format, float16=float16, tracking_uri=tracking_uri)
    if format == "folder":
        typer.echo(f"Wrote {written}; use it as --model {written}")
    else:
        typer.echo(f"Wrote {written}: inputs image (B, C, X, Y, Z) prepared as config.yaml says, skip_mask (0/1 per skip)")


@app.command()
def report(
    experiment: Annotated[str | None, typer.Option(help="Only this experiment (task), for evaluated models.")] = None,
    output: Annotated[
        Path | None,
        typer.Option(help="Write the report to this Markdown file (the study's figures go beside it)."),
    ] = None,
    tracking_uri: StoreOption = None,
) -> None:
    """The skip study from MLflow: tables with 95 % intervals and figures, when the store holds
    `segment study` runs; otherwise every model scored by `segment evaluate --split val` side by
    side, each skip switched off at inference against the model trained without it."""
    from segment import workflows
    from segment.atomic import require_output_file, write_atomically
    from segment.workflows.skip_study import has_study, write_study_report

    if output is not None:
        require_output_file(output, "the report")
    if has_study(tracking_uri):
        output = output or Path("study/report.md")
        write_study_report(output, tracking_uri)
        typer.echo(f"Wrote {output} and its figures in {output.parent / 'figures'}")
        return
    study = workflows.study(experiment, tracking_uri=tracking_uri)
    if not study.runs:
        raise InputError(
            "No evaluated runs yet: evaluate trained models first with "
            "`segment evaluate --model models:/NAME@best --data DIR --split val --ablate-skips`, "
            "or run the skip study with `segment study`."
        )
    text = study.to_markdown()
    typer.echo(text)
    if output is not None:
        write_atomically(output, lambda temporary: temporary.write_text(text))
        typer.echo(f"Wrote {output}")


@app.command(context_settings=TAKES_OVERRIDE_WORDS)
def study(
    context: typer.Context,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per setting and variant.")] = 3,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs per run.")] = 20,
    setting: Annotated[
        list[str] | None, typer.Option(help="Only this setting (repeatable), e.g. hippocampus_3d.")
    ] = None,
    data_root: Annotated[
        list[Path] | None,
        typer.Option(help="Folders holding the MSD tasks (repeatable; default $SEGMENT_DATA_ROOT and ./data)."),
    ] = None,
    output_dir: Annotated[Path, typer.Option(help="Checkpoints, models and logs of the study's runs.")] = Path(
        "study"
    ),
    jobs: Annotated[int, typer.Option(min=1, help="Runs trained at once.")] = 2,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads per run.")] = 1,
    progress: Annotated[bool, typer.Option("--progress", help="Only say how far the study has got.")] = False,
    train: Annotated[
        bool, typer.Option("--train/--no-train", help="Train missing runs, or only analyse and report trained ones.")
    ] = True,
    report: Annotated[Path, typer.Option(help="Where the report is written (figures beside it).")] = Path(
        "study/report.md"
    ),
    overrides: SetOption = None,
    tracking_uri: StoreOption = None,
) -> None:
    """The skip study: every setting trained with skip dropout and without skips, several seeds
    each, then each model analysed for fine detail and the report written. Resumes where it
    stopped: a finished run is not trained or analysed again."""
    from segment.workflows.skip_study import run_study, study_progress

    extra = _overrides(overrides, context)
    if progress:
        typer.echo(study_progress(seeds, epochs, setting, tracking_uri, extra=extra).to_text())
        return
    try:
        done = run_study(
            seeds,
            epochs,
            setting,
            extra=extra,
            data_roots=data_root,
            tracking_uri=tracking_uri,
            output_dir=output_dir,
            jobs=jobs,
            threads=threads,
            train=train,
            report=report,
            say=lambda line: typer.echo(line),
        )
    except KeyboardInterrupt:
        _warn("The study stopped; run the same command again to resume it.")
        raise typer.Exit(code=EXIT_INTERRUPTED) from None
    typer.echo(done.to_text())


@app.command(name="app")
def viewer(
    port: Annotated[int, typer.Option(help="Port to serve the viewer on.")] = 8501,
    address: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps it local.")] = "127.0.0.1",
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow store whose models it offers (default as for train).")
    ] = None,
) -> None:
    """Start the Streamlit viewer (upload a scan, switch skips, see what is lost). Works from
    any folder: the viewer is installed with the package."""
    from segment import workflows

    workflows.serve_viewer(port, address, tracking_uri=tracking_uri)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
