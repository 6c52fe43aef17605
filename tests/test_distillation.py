"""Training from a trained model's weights, and learning from a teacher's softmax output."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, in_test_folder, store_client, tiny_hippocampus_overrides

from segment.config import load_config
from segment.engine.device import make_runtime
from segment.engine.inference import predict_logits
from segment.engine.preparation import prepare
from segment.io import read_scan
from segment.models import ModelLoadError, load_model
from segment.models.sources import resolve_model
from segment.training.run import train
from segment.training.teaching import distillation_loss

CONFIG = ROOT / "configs" / "hippocampus_3d.yaml"


def test_the_distillation_loss_is_zero_on_agreement_and_pulls_the_student_to_the_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 6, 7, 5)
    assert distillation_loss(teacher, teacher, 2.0).abs() < 1e-6
    student = torch.randn(2, 3, 6, 7, 5, requires_grad=True)
    before = distillation_loss(student, teacher, 2.0)
    assert before > 0.1
    before.backward()
    with torch.no_grad():
        after = distillation_loss(student - 5.0 * student.grad, teacher, 2.0)
    assert after < before


@pytest.mark.slow
def test_a_run_starts_from_given_weights_and_learns_from_a_teacher(tmp_path, hippocampus_root):
    first = train(load_config(CONFIG, tiny_hippocampus_overrides()), **in_test_folder(tmp_path, hippocampus_root))
    # Two runs from the first run's weights, alike but for the teacher (a bundled network,
    # which predicts differently from a one-epoch one), same seed, same batches.
    teacher_dir = resolve_model("hippocampus_3d") / "member_3"
    common = [*tiny_hippocampus_overrides(epochs=2), f"trainer.init_from={first.model_dir}"]
    alone = train(load_config(CONFIG, common), **in_test_folder(tmp_path, hippocampus_root))
    taught = train(
        load_config(CONFIG, [*common, f"trainer.teacher={teacher_dir}", "trainer.distill_weight=10.0"]),
        **in_test_folder(tmp_path, hippocampus_root),
    )
    client = store_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    losses = {
        result.run_id: [m.value for m in client.get_metric_history(result.run_id, "train_loss")]
        for result in (alone, taught)
    }
    assert losses[taught.run_id][0] > losses[alone.run_id][0], "the teacher's term adds to the loss"
    run = client.get_run(taught.run_id)
    assert run.data.params["trainer.teacher"] == str(teacher_dir)
    assert run.data.params["trainer.init_from"] == str(first.model_dir)

    # The teacher pulls the weights its way: the taught student agrees with it better.
    teacher, config = load_model(teacher_dir)
    runtime = make_runtime("cpu")
    case = hippocampus_root / "Task04_Hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    volume = prepare(read_scan(case), config).volume
    target = predict_logits(teacher, volume, runtime, config)
    disagreement = {}
    for result in (alone, taught):
        student, student_config = load_model(result.model_dir)
        logits = predict_logits(student, volume, runtime, student_config)
        disagreement[result.run_id] = float(distillation_loss(logits, target, 1.0))
    assert disagreement[taught.run_id] < disagreement[alone.run_id]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["trainer.teacher=isbi2012_2d"],
            "trainer.teacher isbi2012_2d cannot teach this model: its data.task differs",
        ),
        (["trainer.init_from=hippocampus_3d"], "trainer.init_from hippocampus_3d: its weights do not fit"),
        (["trainer.teacher=no/such/folder"], "trainer.teacher no/such/folder: Model 'no/such/folder' is not"),
    ],
)
def test_an_unusable_teacher_or_start_is_refused_before_any_run_is_made(
    tmp_path, hippocampus_root, overrides, message
):
    config = load_config(CONFIG, [*tiny_hippocampus_overrides(), *overrides])
    with pytest.raises(ModelLoadError, match=message):
        train(config, **in_test_folder(tmp_path, hippocampus_root))
    client = store_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    assert client.search_runs(experiment_ids=experiments) == []
    assert not (tmp_path / "runs").exists()
