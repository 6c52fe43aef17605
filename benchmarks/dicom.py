"""Seconds to read a 100-slice 256 x 256 DICOM series against the same voxels as one .nii.gz, and
`segment predict` end to end with the bundled `hippocampus_3d` on that series, a NIfTI mask out
against a DICOM SEG out.

The series is written by data_scripts/nifti_to_dicom.py from the real hippocampus_001 scan padded
with zeros, centred, to 256 x 256 x 100 voxels (1 mm): real intensities where the model looks,
and the size of a clinical MR series. Reads are the median of 5 after one warm-up of each,
taking turns; predictions the median of 3 after one warm-up of each, taking turns. Not run by
`make bench`: the predictions alone take one to two minutes on two cores.

    python benchmarks/dicom.py [--quick] [--json-out FILE] [--data-root DIR]
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from common import ROOT, Row, finish, section_parser, shape_label

from segment import workflows
from segment.data.tasks import resolve_data_root
from segment.io import read_scan

MODEL = "hippocampus_3d"
CASE = "hippocampus_001"
SHAPE, QUICK_SHAPE = (256, 256, 100), (64, 64, 40)


def nifti_to_dicom():
    """``data_scripts/nifti_to_dicom.py``, which is a script in a folder, not a package."""
    spec = importlib.util.spec_from_file_location(
        "nifti_to_dicom", ROOT / "data_scripts" / "nifti_to_dicom.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def padded_case(data_root: str | None, shape: tuple[int, int, int], path: Path) -> Path:
    """The real case padded with zeros, centred, to ``shape``, written as a NIfTI at ``path``;
    ``ConstantPad`` moves the origin, so the case's voxels keep their place in space."""
    image = sitk.ReadImage(
        str(resolve_data_root(data_root) / "Task04_Hippocampus" / "imagesTr" / f"{CASE}.nii.gz")
    )
    missing = np.asarray(shape) - np.asarray(image.GetSize())
    lower = missing // 2
    sitk.WriteImage(sitk.ConstantPad(image, lower.tolist(), (missing - lower).tolist(), 0), str(path))
    return path


def medians(steps: dict[str, Callable[[int], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each step over ``repeats`` calls, after one warm-up call of each; the
    steps take turns, so a slower spell of a shared machine falls on all of them."""
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for run in range(1 + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step(run)
            if run:
                seconds[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(values), 3) for name, values in seconds.items()}


def measure(
    data_root: str | None, shape: tuple[int, int, int], read_repeats: int, predict_repeats: int
) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        nifti = padded_case(data_root, shape, folder / "scan.nii.gz")
        series = nifti_to_dicom().convert(nifti, folder / "series")
        # Both sides of the comparison must be the same voxels, or it compares nothing.
        np.testing.assert_array_equal(read_scan(series).array, read_scan(nifti).array)
        reads = medians(
            {"dicom_series": lambda _: read_scan(series), "nifti": lambda _: read_scan(nifti)}, read_repeats
        )
        predictions = medians(
            {
                "nifti_mask": lambda run: workflows.predict(
                    MODEL, series, folder / f"{run}.nii.gz", progress=False
                ),
                "dicom_seg": lambda run: workflows.predict(
                    MODEL, series, folder / f"{run}.dcm", output_format="dicom-seg", progress=False
                ),
            },
            predict_repeats,
        )
        seg_bytes = (folder / "0.dcm").stat().st_size
    return {
        "source": f"{CASE} padded with zeros, centred",
        "series_shape": list(shape),
        "model": MODEL,
        "torch_threads": torch.get_num_threads(),
        "read_repeats": read_repeats,
        "predict_repeats": predict_repeats,
        "read_seconds": reads,
        "predict_seconds": predictions,
        "dicom_seg_bytes": seg_bytes,
    }


def rows(result: dict) -> list[Row]:
    reads, predictions = result["read_seconds"], result["predict_seconds"]
    return [
        ("series", f"{shape_label(result['series_shape'])} int16 DICOM, {result['source']}"),
        (
            f"read_scan, DICOM series / .nii.gz (median of {result['read_repeats']})",
            f"{reads['dicom_series']:.3f} s / {reads['nifti']:.3f} s",
        ),
        (
            f"predict {result['model']}, NIfTI mask / DICOM SEG out (median of {result['predict_repeats']})",
            f"{predictions['nifti_mask']:.2f} s / {predictions['dicom_seg']:.2f} s",
        ),
        ("DICOM SEG size", f"{result['dicom_seg_bytes'] / 1024:,.0f} KiB"),
    ]


def main() -> None:
    parser = section_parser(__doc__)
    parser.add_argument("--data-root", help="folder holding Task04_Hippocampus (default $SEGMENT_DATA_ROOT)")
    args = parser.parse_args()
    if args.quick:
        result = measure(args.data_root, QUICK_SHAPE, read_repeats=2, predict_repeats=1)
    else:
        result = measure(args.data_root, SHAPE, read_repeats=5, predict_repeats=3)
    finish(args, result, rows)


if __name__ == "__main__":
    main()
