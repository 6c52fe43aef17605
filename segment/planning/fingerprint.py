"""A task's fingerprint: what planning needs to know of an MSD-layout task folder, read once.

Per case: the shape, voxel spacing and channel count in the RAS orientation the network sees,
and which labels occur with how many voxels. Per channel: the intensities inside the labelled
foreground (percentiles, mean, std), from up to :data:`SAMPLES_PER_CASE` foreground voxels of
each case, as nnU-Net samples them; for CT these are the statistics its normalisation uses.
And the modality names and labels of ``dataset.json``.

It is cached as JSON beside the data (``.segment_fingerprint.json`` in the task folder), or,
where that folder is read-only, under ``~/.cache/segment/fingerprints/``. The cache is keyed by
``dataset.json``'s bytes and every listed file's size and modification time, so changing any
of them computes it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from segment.atomic import read_only_ancestor, write_atomically
from segment.errors import SegmentError
from segment.io import nifti_unit

CACHE_NAME = ".segment_fingerprint.json"
# Foreground voxels drawn per case for the intensity statistics: enough for stable percentiles,
# few enough that a task of hundreds of CT volumes holds them in memory (nnU-Net takes 10,000).
SAMPLES_PER_CASE = 10_000
PERCENTILES = (0.5, 50.0, 99.5)
FORMAT = 1  # bump when the fields change, so old caches are computed again


class FingerprintError(SegmentError):
    """A task folder cannot be fingerprinted; the message says which file and why."""


@dataclass(frozen=True)
class CaseFacts:
    name: str
    shape: tuple[int, int, int]  # RAS voxel order
    spacing: tuple[float, float, float]  # RAS order, in the file's unit
    channels: int
    label_voxels: dict[int, int]  # voxels per label value present, background included


@dataclass(frozen=True)
class ChannelStats:
    """Intensities of one channel inside the labelled foreground, over the sampled voxels."""

    percentile_00_5: float
    median: float
    percentile_99_5: float
    mean: float
    std: float


@dataclass(frozen=True)
class Fingerprint:
    task: str
    modalities: dict[int, str]  # input channel -> modality name, from dataset.json
    labels: dict[int, str]
    unit: str  # "mm", or "µm" for the converted EM task
    cases: list[CaseFacts]
    channels: list[ChannelStats] = field(default_factory=list)

    @property
    def spacings(self) -> np.ndarray:
        return np.array([case.spacing for case in self.cases])

    @property
    def shapes(self) -> np.ndarray:
        return np.array([case.shape for case in self.cases])

    @property
    def is_ct(self) -> bool:
        return any(name.strip().upper() == "CT" for name in self.modalities.values())

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        tree = json.loads(text)
        tree.pop("format")
        return cls(
            tree["task"],
            {int(k): v for k, v in tree["modalities"].items()},
            {int(k): v for k, v in tree["labels"].items()},
            tree["unit"],
            [
                CaseFacts(
                    case["name"],
                    tuple(case["shape"]),
                    tuple(case["spacing"]),
                    case["channels"],
                    {int(k): v for k, v in case["label_voxels"].items()},
                )
                for case in tree["cases"]
            ],
            [ChannelStats(**stats) for stats in tree["channels"]],
        )


def _dataset(folder: Path) -> dict:
    listing = folder / "dataset.json"
    try:
        dataset = json.loads(listing.read_text())
    except FileNotFoundError:
        raise FingerprintError(f"{folder} holds no dataset.json; give an MSD-layout task folder.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FingerprintError(f"{listing} is not valid JSON ({error.__class__.__name__}).") from None
    if not isinstance(dataset.get("training"), list) or not dataset["training"]:
        raise FingerprintError(f"{listing} lists no training cases under 'training'.")
    return dataset


def _case_files(folder: Path, dataset: dict) -> list[tuple[Path, Path]]:
    pairs = []
    for entry in dataset["training"]:
        image, label = folder / entry["image"], folder / entry["label"]
        for path in (image, label):
            if not path.is_file():
                raise FingerprintError(
                    f"{folder.name}/dataset.json lists {entry['image']} but {path} does not exist."
                )
        pairs.append((image, label))
    return sorted(pairs)


def cache_key(folder: Path, pairs: list[tuple[Path, Path]]) -> str:
    digest = hashlib.sha256((folder / "dataset.json").read_bytes())
    for path in (path for pair in pairs for path in pair):
        status = path.stat()
        digest.update(f"{path.name}:{status.st_size}:{status.st_mtime_ns}\n".encode())
    return f"{FORMAT}:{digest.hexdigest()}"


def _cache_paths(folder: Path) -> list[Path]:
    """Beside the data first; a per-user cache for folders that cannot be written."""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segment" / "fingerprints"
    name = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return [folder / CACHE_NAME, home / f"{folder.name}-{name}.json"]


def _read_cached(folder: Path, key: str) -> Fingerprint | None:
    for path in _cache_paths(folder):
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if stored.get("key") == key:
            try:
                return Fingerprint.from_json(stored["fingerprint"])
            except (KeyError, TypeError, ValueError):
                continue  # a damaged or older cache is computed again
    return None


def _write_cache(folder: Path, key: str, found: Fingerprint) -> None:
    text = json.dumps({"key": key, "fingerprint": found.to_json()})
    for path in _cache_paths(folder):
        if read_only_ancestor(path.parent.resolve()) is not None:
            continue  # a folder marked read-only (shared data) is not written, even by root
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda temporary: temporary.write_text(text))
            return
        except OSError:
            continue  # read-only data: try the per-user cache


def _ras(image: nib.Nifti1Image) -> tuple[np.ndarray, tuple[int, ...], tuple[float, ...]]:
    """The RAS reorientation of a file's axes, and its shape and spacing in RAS order."""
    orientation = nib.orientations.io_orientation(image.affine)
    order = [int(axis) for axis in orientation[:, 0]]
    shape, zooms = image.shape[:3], np.linalg.norm(image.affine[:3, :3], axis=0)
    ras_shape, ras_spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for file_axis, ras_axis in enumerate(order):
        ras_shape[ras_axis], ras_spacing[ras_axis] = int(shape[file_axis]), round(float(zooms[file_axis]), 6)
    return orientation, tuple(ras_shape), tuple(ras_spacing)


def _load(path: Path) -> nib.Nifti1Image:
    try:
        return nib.load(path)
    except Exception as error:  # nibabel raises many kinds for damaged files
        raise FingerprintError(
            f"{path.name} is not a readable NIfTI file ({error.__class__.__name__})."
        ) from None


def _read_case(image_path: Path, label_path: Path, rng: np.random.Generator) -> tuple[CaseFacts, np.ndarray]:
    """The case's facts and a sample of its foreground intensities, (samples, channels)."""
    image, label = _load(image_path), _load(label_path)
    _, shape, spacing = _ras(image)
    channels = int(image.shape[3]) if len(image.shape) == 4 else 1
    labels = np.asarray(label.dataobj).astype(np.int64).reshape(label.shape[:3])
    if labels.shape != tuple(image.shape[:3]):
        raise FingerprintError(
            f"{label_path.name} has shape {labels.shape} but its image {image_path.name} {tuple(image.shape[:3])}."
        )
    if labels.min() < 0:
        raise FingerprintError(f"{label_path.name} holds negative label values; labels are 0, 1, 2, ...")
    counts = np.bincount(labels.ravel())  # far quicker than np.unique on a CT volume
    foreground = np.flatnonzero(labels > 0)
    chosen = rng.choice(foreground, min(SAMPLES_PER_CASE, foreground.size), replace=False)
    data = np.asarray(image.dataobj, dtype=np.float32).reshape(*labels.shape, channels)
    samples = data.reshape(-1, channels)[chosen]
    name = image_path.name.split(".")[0]
    present = {int(value): int(count) for value, count in enumerate(counts) if count}
    facts = CaseFacts(name, shape, spacing, channels, present)
    return facts, samples


def _channel_stats(samples: np.ndarray) -> list[ChannelStats]:
    stats = []
    for channel in samples.T:
        low, median, high = np.percentile(channel, PERCENTILES)
        stats.append(
            ChannelStats(float(low), float(median), float(high), float(channel.mean()), float(channel.std()))
        )
    return stats


def _unit(image_path: Path) -> str:
    return nifti_unit(_load(image_path).header)


def fingerprint(folder: str | Path, progress: bool = True) -> Fingerprint:
    """The fingerprint of the MSD-layout task ``folder``, from its cache when nothing changed."""
    from tqdm import tqdm

    folder = Path(folder)
    dataset = _dataset(folder)
    pairs = _case_files(folder, dataset)
    key = cache_key(folder, pairs)
    cached = _read_cached(folder, key)
    if cached is not None:
        return cached
    rng = np.random.default_rng(0)  # the same sample, so the same plan, on every machine
    cases, samples = [], []
    for image, label in tqdm(pairs, desc=f"Fingerprinting {folder.name}", unit="case", disable=not progress):
        facts, drawn = _read_case(image, label, rng)
        cases.append(facts)
        samples.append(drawn)
    if not sum(len(drawn) for drawn in samples):
        raise FingerprintError(f"{folder.name}: no case has a labelled voxel; the labels are empty.")
    channels = {case.channels for case in cases}
    if len(channels) > 1:
        raise FingerprintError(f"{folder.name}: cases have different channel counts {sorted(channels)}.")
    found = Fingerprint(
        folder.name,
        {int(k): str(v) for k, v in dataset.get("modality", {"0": "unknown"}).items()},
        {int(k): str(v) for k, v in dataset.get("labels", {}).items()},
        _unit(pairs[0][0]),
        cases,
        _channel_stats(np.concatenate(samples)),
    )
    _write_cache(folder, key, found)
    return found
