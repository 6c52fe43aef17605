"""Training from a trained model's weights, and learning from a teacher's softmax output."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, store_client, tiny_hippocampus_overrides

from segment.config import load_config
from segment.engine.train import distillation_loss, train
from segment.models import ModelLoadError, load_model

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


def in_folder(tmp_path, data_root) -> dict:
    return {
        "data_root": data_root,
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "output_root": tmp_path / "runs",
        "progress": False,
    }


def test_a_run_starts_from_given_weights_and_learns_from_a_teacher(tmp_path, hippocampus_root):
    first = train(load_config(CONFIG, tiny_hippocampus_overrides()), **in_folder(tmp_path, hippocampus_root))
    trained, _ = load_model(first.model_dir)
    # A learning rate of almost nothing: the student's weights stay where init_from put them.
    overrides = [
        *tiny_hippocampus_overrides(),
        "trainer.lr=1e-12",
        f"trainer.init_from={first.model_dir}",
        f"trainer.teacher={first.model_dir}",
        "trainer.distill_weight=2.0",
    ]
    second = train(load_config(CONFIG, overrides), **in_folder(tmp_path, hippocampus_root))
    student, _ = load_model(second.model_dir)
    for (name, original), (_, continued) in zip(
        trained.state_dict().items(), student.state_dict().items(), strict=True
    ):
        assert torch.allclose(original, continued, atol=1e-6), name
    assert second.best_mean_dice == pytest.approx(first.best_mean_dice, abs=1e-4)
    run = store_client(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(second.run_id)
    assert run.data.params["trainer.teacher"] == str(first.model_dir)
    assert run.data.params["trainer.distill_weight"] == "2.0"


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
        train(config, **in_folder(tmp_path, hippocampus_root))
    client = store_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    assert client.search_runs(experiment_ids=experiments) == []
    assert not (tmp_path / "runs").exists()
