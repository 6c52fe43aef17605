"""``predict``: scans in, label masks out, each with its scan's shape, affine and orientation."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from segment.atomic import require_output_file, require_writable
from segment.engine.inference import predict_labels
from segment.engine.postprocessing import PostProcessing, postprocess
from segment.engine.preparation import prepare
from segment.engine.uncertainty import DEFAULT_SAMPLES, estimate
from segment.errors import DiskFullError, InputError
from segment.io import (
    NIFTI_SUFFIXES,
    SUPPORTED_SUFFIXES,
    ScanError,
    read_scan,
    scan_stem,
    scan_suffix,
    write_maps,
    write_mask,
)
from segment.workflows.models import load

OUTPUT_FORMATS = ("nifti", "dicom-seg")


@dataclass(frozen=True)
class PredictedMask:
    """One mask written: where from, where to, and its voxels per label."""

    scan: Path
    mask: Path
    voxels: dict[str, int]
    warnings: list[str] = field(default_factory=list)  # odd but usable input, e.g. NaN voxels repaired
    maps: dict[str, Path] = field(default_factory=dict)  # "probabilities", "uncertainty": where written
    samples_from: str | None = None  # how the maps' samples were drawn


@dataclass(frozen=True)
class PredictionResult:
    model: str
    masks: list[PredictedMask]
    skipped: list[str] = field(default_factory=list)  # one sentence per scan of a folder that could not be used


def _targets(input: Path, output: Path) -> list[tuple[Path, Path]]:
    """(scan, mask file) pairs: one scan, or a folder of one DICOM series, to a file (or into a
    folder); or a folder of scans to a folder."""
    suffixes = ", ".join(SUPPORTED_SUFFIXES)
    scans = sorted(path for path in input.iterdir() if scan_suffix(path)) if input.is_dir() else []
    if input.is_dir() and not any(input.iterdir()):
        raise InputError(f"{input} is empty; give scans ({suffixes}) or a folder of one DICOM series.")
    if input.is_dir() and not scans:
        # A folder without scans is read as one DICOM series (read_scan says why if it is not).
        if output.is_dir():
            output = output / f"{input.name}.nii.gz"
        if not scan_suffix(output):
            raise InputError(f"{output.name}: the mask needs a scan suffix ({suffixes}).")
        targets = [(input, output)]
    elif input.is_dir():
        if output.exists() and not output.is_dir():
            raise InputError(f"{output} is a file; give a folder for the masks of a folder of scans.")
        targets = [(scan, output / scan.name) for scan in scans]
    else:
        if not input.exists():
            raise InputError(f"{input} does not exist.")
        if output.is_dir():
            # A zipped DICOM series gives a NIfTI mask named after the archive.
            output = output / (input.name if scan_suffix(input) else f"{scan_stem(input)}.nii.gz")
        if not scan_suffix(output):
            raise InputError(f"{output.name}: the mask needs a scan suffix ({suffixes}).")
        targets = [(input, output)]
    if any(target.resolve() == source.resolve() for source, target in targets):
        raise InputError("The masks would overwrite the scans they come from; give another output so the scans are kept.")
    require_writable(targets[0][1].parent, "masks")
    return targets


def _seg_target(input: Path, output: Path) -> list[tuple[Path, Path]]:
    """The (series folder, SEG file) pair for a DICOM SEG: a SEG references the DICOM images it
    segments, so its input can only be a folder of one DICOM series."""
    if not input.exists():
        raise InputError(f"{input} does not exist.")
    if not input.is_dir() or any(scan_suffix(path) for path in input.iterdir()):
        raise InputError(
            f"{input.name} is not a folder of one DICOM series, and a DICOM SEG can only reference "
            "DICOM images; give the series folder, or --output-format nifti."
        )
    if output.is_dir():
        output = output / f"{input.name}.seg.dcm"
    if output.suffix.lower() != ".dcm":
        raise InputError(
            f"{output.name}: a DICOM SEG is a .dcm file; give a file name ending in .dcm, or a folder."
        )
    if output.resolve().is_relative_to(input.resolve()):
        # The SEG is a series of its own: inside the folder it would make it two series.
        raise InputError(f"{output} is inside the series folder it segments; write the DICOM SEG elsewhere.")
    require_writable(output.parent, "the DICOM SEG")
    return [(input, output)]


def _mask_writer(output_format: str, model: str, skip_mask: Sequence[int] | None) -> Callable[..., Path]:
    """``write_mask``'s signature, for the format asked for."""
    if output_format == "nifti":
        return write_mask
    from segment.dicom_seg import write_segmentation  # highdicom loads only when a SEG is asked for

    return functools.partial(write_segmentation, model=model, skip_mask=skip_mask)


def _map_targets(option: str | Path | None, targets: list[tuple[Path, Path]], what: str) -> list[Path | None]:
    """Where each scan's ``what`` map goes: the file given for one scan, or the folder given
    (one ``<scan>.nii.gz`` per scan)."""
    if option is None:
        return [None] * len(targets)
    option = Path(option)
    if len(targets) == 1 and not option.is_dir():
        if scan_suffix(option) not in NIFTI_SUFFIXES:
            raise InputError(f"{option.name}: {what} maps are written as NIfTI; give a .nii.gz or .nii file.")
        require_output_file(option, f"the {what} map")
        return [option]
    if option.exists() and not option.is_dir():
        raise InputError(f"{option} is a file; give a folder for the {what} maps of a folder of scans.")
    require_writable(option, f"{what} maps")
    return [option / f"{scan_stem(source)}.nii.gz" for source, _ in targets]


def predict(
    model: str,
    input: str | Path,
    output: str | Path,
    skip_mask: Sequence[int] | None = None,
    *,
    postprocessing: PostProcessing | None = None,
    probabilities: str | Path | None = None,
    uncertainty: str | Path | None = None,
    samples: int = DEFAULT_SAMPLES,
    output_format: str = "nifti",
    device: str = "auto",
    tracking_uri: str | None = None,
    progress: bool = True,
) -> PredictionResult:
    """Segment a scan (``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``, or a folder holding one DICOM
    series) or a folder of scans. A model with several input channels reads 4D NIfTI scans
    whose 4th dimension holds them (:func:`segment.io.read_scan`).

    ``skip_mask`` switches long skips on (1) or off (0), finest level first; None keeps the
    model's own. ``postprocessing`` cleans each mask before it is written (keep each label's
    largest component, drop components under a minimum size).

    ``probabilities`` (a file, or a folder for a folder of scans) gets a NIfTI of the mean
    softmax, one channel per label, on the scan's voxels; ``uncertainty`` gets the entropy
    and, from an ensemble's members or ``samples`` skip settings of a skip-dropout model,
    their disagreement (:mod:`segment.engine.uncertainty`; values in [0, 1] stored as scaled
    uint16, :func:`segment.io.write_maps`).

    ``output_format`` ``dicom-seg`` writes the mask of a DICOM series folder as a DICOM SEG
    (``output``: a ``.dcm`` file, or a folder to hold ``<series folder>.seg.dcm``) referencing
    that series (:mod:`segment.dicom_seg`); the maps stay NIfTI.

    In a folder, a scan that cannot be used is skipped and named in ``skipped``; a single scan
    that cannot be used raises :class:`ScanError`."""
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"--output-format {output_format}: use {' or '.join(OUTPUT_FORMATS)}.")
    if output_format == "dicom-seg":
        targets = _seg_target(Path(input), Path(output))
    else:
        targets = _targets(Path(input), Path(output))
    probability_paths = _map_targets(probabilities, targets, "probability")
    uncertainty_paths = _map_targets(uncertainty, targets, "uncertainty")
    if samples < 1:
        raise InputError(f"--samples {samples}: give at least 1.")
    loaded = load(model, tracking_uri=tracking_uri, device=device)
    if skip_mask is not None:
        loaded.network.resolve_skip_mask(skip_mask)  # the wrong length fails before any scan is read
    network, config, runtime = loaded.network, loaded.config, loaded.runtime
    label_names = config.label_names
    write = _mask_writer(output_format, model, skip_mask)
    masks, skipped = [], []
    for (source, target), probability_path, uncertainty_path in zip(
        targets, probability_paths, uncertainty_paths, strict=True
    ):
        maps: dict[str, Path] = {}
        try:
            scan = read_scan(source, config.model.in_channels)
            prepared = prepare(scan, config)
            labels = predict_labels(
                network, prepared, runtime, config, skip_mask, progress=progress and len(targets) == 1
            )
            if postprocessing is not None:
                labels = postprocess(labels, float(np.prod(scan.spacing)), postprocessing)
            write(labels, scan, target, label_names)
            if probability_path or uncertainty_path:
                found = estimate(network, prepared.volume, runtime, config, skip_mask, samples)
                maps = _write_maps(found, prepared, scan, label_names, probability_path, uncertainty_path)
        except DiskFullError:
            raise  # one sentence already, naming the file that did not fit: the mask or a map
        except OSError as error:
            raise InputError(f"Cannot write {target}: {error.strerror or error}.") from None
        except ScanError as error:
            if len(targets) == 1:
                raise
            skipped.append(str(error))
            continue
        voxels = {name: int((labels == value).sum()) for value, name in label_names.items() if value > 0}
        masks.append(
            PredictedMask(
                source, target, voxels, list(scan.warnings), maps, found.source if maps else None
            )
        )
    return PredictionResult(model, masks, skipped)


def _write_maps(found, prepared, scan, label_names, probability_path, uncertainty_path) -> dict[str, Path]:
    written = {}
    if probability_path is not None:
        names = ", ".join(label_names[value] for value in sorted(label_names))
        probabilities = prepared.restore_maps(found.probabilities)
        written["probabilities"] = write_maps(probabilities, scan, probability_path, f"softmax: {names}")
    if uncertainty_path is not None:
        channels = [found.entropy] + ([found.disagreement] if found.disagreement is not None else [])
        maps = prepared.restore_maps(torch.cat(channels, dim=1))
        what = "entropy" + (", disagreement" if found.disagreement is not None else "")
        written["uncertainty"] = write_maps(maps, scan, uncertainty_path, f"{what}; {found.source}")
    return written
