"""``predict``: scans in, label masks out, each with its scan's shape, affine and orientation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from segment.atomic import require_writable
from segment.engine.inference import segment_scan
from segment.errors import InputError
from segment.io import SUPPORTED_SUFFIXES, ScanError, read_scan, scan_suffix, write_mask
from segment.workflows.models import load


@dataclass(frozen=True)
class PredictedMask:
    """One mask written: where from, where to, and its voxels per label."""

    scan: Path
    mask: Path
    voxels: dict[str, int]
    warnings: list[str] = field(default_factory=list)  # odd but usable input, e.g. NaN voxels repaired


@dataclass(frozen=True)
class PredictionResult:
    model: str
    masks: list[PredictedMask]
    skipped: list[str] = field(default_factory=list)  # one sentence per scan of a folder that could not be used


def _targets(input: Path, output: Path) -> list[tuple[Path, Path]]:
    """(scan, mask file) pairs: one scan to a file (or into a folder), or a folder to a folder."""
    suffixes = ", ".join(SUPPORTED_SUFFIXES)
    if input.is_dir():
        scans = sorted(path for path in input.iterdir() if scan_suffix(path))
        if not scans:
            raise InputError(f"{input} holds no scans ({suffixes}).")
        if output.exists() and not output.is_dir():
            raise InputError(f"{output} is a file; give a folder for the masks of a folder of scans.")
        targets = [(scan, output / scan.name) for scan in scans]
    else:
        if not input.exists():
            raise InputError(f"{input} does not exist.")
        if output.is_dir():
            output = output / input.name
        if not scan_suffix(output):
            raise InputError(f"{output.name}: the mask needs a scan suffix ({suffixes}).")
        targets = [(input, output)]
    if any(target.resolve() == source.resolve() for source, target in targets):
        raise InputError("The masks would overwrite the scans they come from; give another output so the scans are kept.")
    require_writable(targets[0][1].parent, "masks")
    return targets


def predict(
    model: str,
    input: str | Path,
    output: str | Path,
    skip_mask: Sequence[int] | None = None,
    *,
    device: str = "auto",
    tracking_uri: str | None = None,
    progress: bool = True,
) -> PredictionResult:
    """Segment a scan (``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``) or a folder of them.

    ``skip_mask`` switches long skips on (1) or off (0), finest level first; None keeps the
    model's own. In a folder, a scan that cannot be used is skipped and named in
    ``skipped``; a single scan that cannot be used raises :class:`ScanError`."""
    targets = _targets(Path(input), Path(output))
    loaded = load(model, tracking_uri=tracking_uri, device=device)
    if skip_mask is not None:
        loaded.network.resolve_skip_mask(skip_mask)  # the wrong length fails before any scan is read
    label_names = loaded.config.label_names
    masks, skipped = [], []
    for source, target in targets:
        try:
            scan = read_scan(source)
            labels = segment_scan(
                loaded.network, loaded.config, scan, loaded.runtime, skip_mask, progress=progress and len(targets) == 1
            )
            write_mask(labels, scan, target, label_names)
        except OSError as error:
            raise InputError(f"Cannot write {target}: {error.strerror or error}.") from None
        except ScanError as error:
            if len(targets) == 1:
                raise
            skipped.append(str(error))
            continue
        voxels = {name: int((labels == value).sum()) for value, name in label_names.items() if value > 0}
        masks.append(PredictedMask(source, target, voxels, list(scan.warnings)))
    return PredictionResult(model, masks, skipped)
