"""Training augmentation on real hippocampus cases: what it may change and what it must keep."""

from __future__ import annotations

import torch
from conftest import ROOT

from segment.config import load_config
from segment.data.tasks import split_task
from segment.data.transforms import training_transforms, validation_transforms

CONFIG = ROOT / "configs" / "hippocampus_3d.yaml"


def first_training_case(hippocampus_root, overrides: list[str]):
    """(config, the first training case) of a few real cases with ``overrides``."""
    config = load_config(CONFIG, ["data.max_cases=4", *overrides])
    return config, split_task(config.data, hippocampus_root, download=False).train[0]


def test_nnunet_intensity_augmentation_changes_intensities_but_never_labels(hippocampus_root):
    config, case = first_training_case(
        hippocampus_root, ["data.intensity_augment=nnunet", "data.affine_augment_prob=0", "data.flip_axes=[]"]
    )
    transform = training_transforms(config)
    transform.set_random_state(seed=0)
    plain = validation_transforms(config)(dict(case))
    samples = [transform(dict(case)) for _ in range(8)]
    for sample in samples:
        assert sample["image"].shape == plain["image"].shape
        assert torch.isfinite(sample["image"]).all()
        assert torch.equal(sample["label"], torch.as_tensor(plain["label"]))
    changed = sum(not torch.allclose(s["image"], torch.as_tensor(plain["image"])) for s in samples)
    assert changed >= len(samples) // 2


def test_rotation_and_scaling_move_image_and_label_together(hippocampus_root):
    # The label file read as the image too: after the same rotation and scaling, the bright
    # voxels of the (bilinearly resampled) image must be the labelled voxels.
    config, case = first_training_case(
        hippocampus_root,
        ["data.affine_augment_prob=1", "data.rotate_degrees=30", "data.scale_range=[0.7,1.4]", "data.flip_axes=[]"],
    )
    label_as_image = {"image": case["label"], "label": case["label"]}
    plain = validation_transforms(config)(dict(label_as_image))
    truth = torch.as_tensor(plain["label"])
    background, foreground = (torch.as_tensor(plain["image"])[truth == v].mean() for v in (0, 1))
    threshold = (background + foreground) / 2
    transform = training_transforms(config)
    transform.set_random_state(seed=0)
    for _ in range(4):
        sample = transform(dict(label_as_image))
        label = sample["label"]
        # Nearest-neighbour resampling: no label value is invented.
        assert set(label.unique().tolist()) <= {0, 1, 2}
        assert not torch.equal(label, truth)
        agreement = ((sample["image"] > threshold) == (label > 0)).float().mean()
        assert agreement > 0.99
