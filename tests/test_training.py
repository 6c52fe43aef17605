"""Training on real hippocampus cases: MLflow runs, resume after interruption, DDP, bad data."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import pytest
import torch
from conftest import (
    ROOT,
    in_test_folder,
    one_sentence_error,
    resume_training,
    run_segment,
    set_args,
    start_tiny_training,
    store_client,
    tiny_hippocampus_overrides,
)
from mlflow import MlflowClient
from typer.testing import CliRunner

from segment import workflows
from segment.cli import app
from segment.config import ConfigError, load_config
from segment.models import UNet, load_model
from segment.training.checkpoint import load_checkpoint
from segment.training.run import train

CONFIG = str(ROOT / "configs" / "hippocampus_3d.yaml")


def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_a_short_run_is_fully_tracked_and_its_model_registered(tmp_path, hippocampus_root):
    config = load_config(CONFIG, tiny_hippocampus_overrides(epochs=2))
    figures_before = plt.get_fignums()
    result = train(config, **in_test_folder(tmp_path, hippocampus_root))

    client = store_client(store(tmp_path))
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "Task04_Hippocampus"
    assert run.data.params["model.levels"] == "3"
    assert run.data.params["model.skip_dropout"] == "0.1"
    assert run.data.params["trainer.max_epochs"] == "2"
    assert run.data.tags["git_commit"]
    assert run.data.tags["device"].startswith("cpu")
    mlflow.set_tracking_uri(store(tmp_path))
    split = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/split.json")
    assert run.data.tags["dataset_fingerprint"] == split["fingerprint"]
    assert len(split["train"]) == 6 and len(split["val"]) == 2
    assert not set(split["train"]) & set(split["val"])
    for key in (
        "train_loss",
        "lr",
        "epoch_seconds",
        "samples_per_second",
        "val_mean_dice",
        "val_dice_Anterior",
        "val_dice_Posterior",
    ):
        assert metric_steps(client, result.run_id, key) == [1, 2], key
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "split.json", "learning_curves.png", "validation_overlay.png"} <= artifacts
    assert not [number for number in plt.get_fignums() if number not in figures_before], "figures released"

    assert set(result.best_dice) == {"Anterior", "Posterior"}
    # The summary, the run's metrics and the registry tell the same best epoch.
    history = dict((m.step, m.value) for m in client.get_metric_history(result.run_id, "val_mean_dice"))
    assert result.best_mean_dice == pytest.approx(max(history.values()))
    assert history[result.best_epoch] == pytest.approx(result.best_mean_dice)
    assert result.best_mean_dice == pytest.approx(sum(result.best_dice.values()) / 2)
    assert run.data.metrics["best_val_mean_dice"] == pytest.approx(result.best_mean_dice)
    best = client.get_model_version_by_alias("hippocampus_3d", "best")
    assert best.run_id == result.run_id
    downloaded = mlflow.artifacts.download_artifacts(
        "models:/hippocampus_3d@best", dst_path=str(tmp_path / "dl")
    )
    model, loaded_config = load_model(downloaded)
    # The saved config records what "auto" resolved to on this machine.
    assert loaded_config == config.model_copy(
        update={
            "labels": {0: "background", 1: "Anterior", 2: "Posterior"},
            "data": config.data.model_copy(update={"loader": "workers"}),
            "trainer": config.trainer.model_copy(update={"deterministic": True}),
        }
    )
    assert model(torch.zeros(1, 1, 20, 24, 20)).shape == (1, 3, 20, 24, 20)


@pytest.mark.slow
def test_runs_tell_apart_in_the_mlflow_ui_by_name_dataset_and_kind(tmp_path, hippocampus_root):
    overrides = tiny_hippocampus_overrides()
    result = workflows.train(
        CONFIG, overrides, data_root=hippocampus_root, tracking_uri=store(tmp_path),
        output_dir=tmp_path / "runs", progress=False,
    )
    client = store_client(store(tmp_path))
    run = client.get_run(result.run_id)
    assert run.info.run_name == " ".join(["hippocampus_3d", *overrides])
    (used,) = run.inputs.dataset_inputs
    assert used.dataset.name == "Task04_Hippocampus"
    assert used.dataset.digest == run.data.tags["dataset_fingerprint"]
    tags = {tag.key: tag.value for tag in used.tags}
    assert tags["mlflow.data.context"] == "training"
    assert tags["split"] == "25% validation, split seed 0"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_same_split_and_fingerprint_for_the_same_seed(tmp_path, hippocampus_root):
    from segment.data.tasks import split_task

    config = load_config(CONFIG, ["data.max_cases=40"]).data
    first, again = split_task(config, hippocampus_root), split_task(config, hippocampus_root)
    assert first.as_record() == again.as_record()
    other = split_task(config.model_copy(update={"split_seed": 1}), hippocampus_root)
    assert other.fingerprint != first.fingerprint


def test_without_a_split_seed_the_last_cases_in_name_order_validate(hippocampus_root):
    from segment.data.tasks import split_task

    config = load_config(CONFIG, ["data.max_cases=10", "data.val_fraction=0.3", "data.split_seed=null"]).data
    record = split_task(config, hippocampus_root).as_record()
    ordered = sorted(record["train"] + record["val"])
    assert record["val"] == ordered[-3:] and record["train"] == ordered[:-3]


def test_cross_validation_folds_validate_on_every_case_exactly_once(hippocampus_root):
    from segment.data.tasks import split_task

    config = load_config(CONFIG, ["data.max_cases=23", "data.folds=5"]).data
    splits = [split_task(config.model_copy(update={"fold": fold}), hippocampus_root) for fold in range(5)]
    records = [split.as_record() for split in splits]
    every_case = set(records[0]["train"]) | set(records[0]["val"])
    validated = [case for record in records for case in record["val"]]
    assert sorted(validated) == sorted(every_case) and len(every_case) == 23
    for record in records:
        assert len(record["val"]) in (4, 5)
        assert set(record["train"]) == every_case - set(record["val"])


def test_more_folds_than_cases_is_refused_in_one_sentence(hippocampus_root):
    from segment.data.tasks import split_task

    config = load_config(CONFIG, ["data.max_cases=3", "data.folds=5"]).data
    with pytest.raises(ConfigError, match=r"data\.folds=5 needs at least 5 labelled cases, but .* has 3"):
        split_task(config, hippocampus_root)


@pytest.mark.slow
def test_runs_lists_every_run_and_averages_each_cross_validation_over_its_folds(tmp_path, hippocampus_root):
    """Both folds of one recipe and one fold of another: the table lists all three runs, and
    each recipe's folds are averaged apart, named by the setting that tells them apart."""
    results = {}
    for fold, seed in ((0, 0), (1, 0), (0, 1)):
        overrides = [*tiny_hippocampus_overrides(), "data.folds=2", f"data.fold={fold}", f"trainer.seed={seed}"]
        results[fold, seed] = train(load_config(CONFIG, overrides), **in_test_folder(tmp_path, hippocampus_root))

    listing = CliRunner().invoke(app, ["runs", "--tracking-uri", store(tmp_path)])
    assert listing.exit_code == 0, listing.output
    table, summary = listing.output.split("\nCross-validations")
    assert all(result.run_id in table for result in results.values())
    lines = summary.splitlines()
    both = [results[0, 0], results[1, 0]]
    [complete] = [n for n, line in enumerate(lines) if "folds 0, 1 of 2:" in line]
    mean_dice = sum(result.best_mean_dice for result in both) / 2
    anterior = sum(result.best_dice["Anterior"] for result in both) / 2
    assert f"{mean_dice:.4f} (Anterior {anterior:.4f} / Posterior" in lines[complete], lines[complete]
    assert lines[complete + 1 : complete + 3] == [
        "  recipe: trainer.seed=0",
        f"  runs: {results[0, 0].run_id} {results[1, 0].run_id}",
    ]
    [partial] = [n for n, line in enumerate(lines) if "folds 0 of 2 (1 not finished):" in line]
    assert f"{results[0, 1].best_mean_dice:.4f}" in lines[partial]
    assert lines[partial + 1] == "  recipe: trainer.seed=1"


@pytest.mark.slow
def test_an_interrupted_run_resumes_in_the_same_mlflow_run(tmp_path, hippocampus_root):
    env = os.environ | {"SEGMENT_DATA_ROOT": str(hippocampus_root), "MLFLOW_TRACKING_URI": store(tmp_path)}
    runs = tmp_path / "runs"
    process = start_tiny_training(
        tmp_path, env, runs, epochs=200, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while not list(runs.glob("*/checkpoint.pt")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert list(runs.glob("*/checkpoint.pt")), "no checkpoint appeared"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "segment train --resume" in stderr

    run_id = next(runs.iterdir()).name
    client = store_client(store(tmp_path))
    assert client.get_run(run_id).info.status == "KILLED"
    done = len(metric_steps(client, run_id, "train_loss"))
    assert done >= 1

    resumed = resume_training(run_id, runs, done + 1, tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Finished run {run_id}" in resumed.stdout
    assert [path.name for path in runs.iterdir()] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert metric_steps(client, run_id, "train_loss") == list(range(1, done + 2))


@pytest.mark.slow
def test_a_moving_average_of_the_weights_is_validated_kept_and_resumed(tmp_path, hippocampus_root):
    config = load_config(CONFIG, [*tiny_hippocampus_overrides(epochs=1), "trainer.ema_decay=0.9"])
    runs = tmp_path / "runs"
    where = in_test_folder(tmp_path, hippocampus_root)
    first = train(config, **where)

    checkpoint = load_checkpoint(runs / first.run_id)
    live, averaged = checkpoint["model"], checkpoint["averaged"]
    assert int(averaged["n_averaged"]) == checkpoint["state"].global_step > 1
    kept, _ = load_model(first.model_dir)
    kept_weights = kept.state_dict()
    # The kept best model is the average, not the last weights.
    assert all(torch.equal(tensor, averaged[f"module.{name}"]) for name, tensor in kept_weights.items())
    assert any(not torch.equal(tensor, live[name]) for name, tensor in kept_weights.items())

    train(resume=first.run_id, overrides_on_resume=["trainer.max_epochs=2"], **where)
    resumed = load_checkpoint(runs / first.run_id)
    # The average carried on over both sessions rather than restarting.
    assert int(resumed["averaged"]["n_averaged"]) == resumed["state"].global_step
    assert resumed["state"].global_step == 2 * checkpoint["state"].global_step


@pytest.mark.slow
def test_a_deeply_supervised_model_trains_and_predicts_at_full_resolution(tmp_path, hippocampus_root):
    config = load_config(CONFIG, [*tiny_hippocampus_overrides(epochs=2), "model.deep_supervision=1"])
    result = train(config, **in_test_folder(tmp_path, hippocampus_root))
    losses = [m.value for m in store_client(store(tmp_path)).get_metric_history(result.run_id, "train_loss")]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert result.best_mean_dice > 0
    model, saved = load_model(result.model_dir)
    assert saved.model.deep_supervision == 1
    volume = torch.randn(1, 1, 35, 51, 33)
    with torch.no_grad():
        assert model.eval()(volume).shape == (1, 3, 35, 51, 33)


@pytest.mark.slow
def test_a_step_with_a_non_finite_gradient_is_skipped_and_counted(tmp_path, hippocampus_root):
    # CPU bf16 convolutions now and then return a NaN weight gradient; one such step must not
    # poison the weights. The first training step's output gradient is made NaN here.
    poisoned = []

    def poison_first_training_step(module, inputs, output):
        if isinstance(module, UNet) and module.training and torch.is_grad_enabled() and not poisoned:
            poisoned.append(True)
            output.register_hook(lambda gradient: torch.full_like(gradient, float("nan")))

    hook = torch.nn.modules.module.register_module_forward_hook(poison_first_training_step)
    try:
        config = load_config(CONFIG, tiny_hippocampus_overrides(epochs=2))
        result = train(config, **in_test_folder(tmp_path, hippocampus_root))
    finally:
        hook.remove()

    assert poisoned
    client = store_client(store(tmp_path))
    skipped = {m.step: m.value for m in client.get_metric_history(result.run_id, "skipped_steps")}
    assert skipped == {1: 1.0, 2: 0.0}
    losses = [m.value for m in client.get_metric_history(result.run_id, "train_loss")]
    assert all(math.isfinite(loss) for loss in losses)
    weights = load_checkpoint(tmp_path / "runs" / result.run_id)["model"]
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert result.best_mean_dice > 0


@pytest.mark.slow
def test_two_gloo_processes_train_one_run_and_log_once(tmp_path, hippocampus_root):
    env = os.environ | {
        "SEGMENT_DATA_ROOT": str(hippocampus_root),
        "MLFLOW_TRACKING_URI": store(tmp_path),
        "OMP_NUM_THREADS": "1",
        # A process that aborts in native code prints where its Python threads were.
        "PYTHONFAULTHANDLER": "1",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "segment.cli",
        "train",
        "--config",
        CONFIG,
        "--output-dir",
        str(tmp_path / "runs"),
        "--quiet",
        *set_args(tiny_hippocampus_overrides(epochs=2)),
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-8000:]}"
    assert result.stdout.count("Finished run") == 1
    client = store_client(store(tmp_path))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    assert metric_steps(client, run_id, "train_loss") == [1, 2]
    assert metric_steps(client, run_id, "val_mean_dice") == [1, 2]
    # Two processes each see half the 6 training cases: 3 per epoch, 2 per batch -> 1 step each.
    assert [int(v.version) for v in client.search_model_versions("name='hippocampus_3d'")] == [1]


@pytest.mark.slow
def test_missing_data_gives_one_clear_sentence(tmp_path):
    # An unknown task cannot be downloaded, so this needs no network on any machine.
    result = run_segment(
        "train", "--config", CONFIG, "--data-root", str(tmp_path), "--set", "data.task=Task90_ISBI2012",
        cwd=tmp_path,
        env=os.environ | {"MLFLOW_TRACKING_URI": store(tmp_path)},
    )
    message = one_sentence_error(result)
    assert result.returncode == 2
    assert "Task90_ISBI2012 was not found: expected" in message
    assert "SEGMENT_DATA_ROOT" in message


def test_learning_rate_warms_up_then_decays_to_zero():
    from segment.training.schedule import learning_rate

    trainer = load_config(CONFIG).trainer
    peak = trainer.lr
    assert learning_rate(trainer, 0.0, 0, 10) == pytest.approx(peak / 10)
    assert learning_rate(trainer, 0.0, 9, 10) == pytest.approx(peak)
    assert learning_rate(trainer, 0.5, 50, 10) == pytest.approx(peak / 2)
    assert learning_rate(trainer, 1.0, 100, 10) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_a_2d_patch_model_trains_on_converted_isbi_slices(tmp_path, hippocampus_root):
    source = hippocampus_root / "ISBI2012_EM_membrane"
    converted = subprocess.run(
        [
            sys.executable,
            str(ROOT / "data_scripts" / "isbi2012_to_nifti.py"),
            "--source",
            str(source),
            "--output",
            str(tmp_path / "Task90_ISBI2012"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert converted.returncode == 0, converted.stderr
    overrides = [
        "data.max_cases=4",
        "data.val_fraction=0.25",
        "data.patch_size=[64,64]",
        "data.patches_per_volume=2",
        "model.levels=3",
        "model.base_channels=4",
        "trainer.max_epochs=1",
        "trainer.batch_size=2",
        "trainer.warmup_epochs=0",
        "trainer.roi_size=[64,64]",
    ]
    config = load_config(ROOT / "configs" / "isbi2012_2d.yaml", overrides)
    result = train(config, **in_test_folder(tmp_path, tmp_path))
    assert set(result.best_dice) == {"membrane"}
    assert result.best_dice["membrane"] == pytest.approx(result.best_mean_dice)
    # Patches of 64 x 64 trained, whole 512 x 512 slices validated through the sliding window.
    model, _ = load_model(result.model_dir)
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 2, 64, 64)


def test_a_store_named_relative_to_the_working_folder_stays_there_when_a_process_moves(tmp_path, monkeypatch):
    from segment.tracking.store import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:///runs/store.db") == f"sqlite:///{tmp_path / 'runs' / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'env.db'}"
    for fixed in ("sqlite:////srv/mlflow.db", "http://127.0.0.1:5055", "sqlite:///:memory:"):
        assert resolve_tracking_uri(fixed) == fixed
