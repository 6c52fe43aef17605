"""The numbers the viewer shows for a mask, computed without Streamlit: the metrics table
(volumes, the change against all skips on, the model trained without them, a second model
compared, the mean uncertainty, scores against a ground truth), the lines that summarise it,
and the downloads."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from segment.engine.metrics import CaseScores
from segment.engine.skip_explorer import MaskChange
from segment.io import Scan, write_mask

METRICS = ("dice", "hd95", "nsd")


@dataclass(frozen=True)
class PeerMask:
    """Another model's mask of the same scan beside the one shown: the model trained without
    the switched-off skips, or a second model picked to compare with."""

    title: str
    mask: np.ndarray
    change: MaskChange  # of this mask against the one shown


def volume_column(scan: Scan) -> str:
    return f"volume ({scan.volume_unit})"


def change_column(scan: Scan) -> str:
    return f"change vs all skips on ({scan.volume_unit})"


def _volumes(mask: np.ndarray, scan: Scan, labels: Iterable[int]) -> list[float]:
    return [round(float((mask == value).sum()) * scan.voxel_volume, 4) for value in labels]


def metrics_table(
    label_names: Mapping[int, str],
    scan: Scan,
    mask: np.ndarray,
    change: MaskChange,
    peer: PeerMask | None = None,
    scores: Mapping[str, CaseScores] | None = None,
    compared: PeerMask | None = None,
    uncertainty: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per label (background left out): volume, change and Dice against all skips on,
    the trained-without model's and the compared model's volume and agreement, the mean
    uncertainty inside the label, and ``<metric> vs truth (<when>)`` for each scored mask in
    ``scores`` ("now", "all on", "trained without", "compared")."""
    labels = [(value, name) for value, name in sorted(label_names.items()) if value > 0]
    names = [name for _, name in labels]
    table = pd.DataFrame(
        {
            "label": names,
            volume_column(scan): _volumes(mask, scan, (value for value, _ in labels)),
            change_column(scan): [round(change.volume_change[name], 4) for name in names],
            "Dice vs all skips on": [round(change.dice_to_reference[name], 4) for name in names],
        }
    )
    if peer is not None:
        table[f"volume, trained without ({scan.volume_unit})"] = _volumes(
            peer.mask, scan, (value for value, _ in labels)
        )
        table["Dice, switched off vs trained without"] = [
            round(peer.change.dice_to_reference[name], 4) for name in names
        ]
    if compared is not None:
        table[f"volume, compared ({scan.volume_unit})"] = _volumes(
            compared.mask, scan, (value for value, _ in labels)
        )
        table["Dice vs compared"] = [round(compared.change.dice_to_reference[name], 4) for name in names]
    if uncertainty is not None:
        table["mean uncertainty"] = [
            round(float(uncertainty[mask == value].mean()), 4) if (mask == value).any() else float("nan")
            for value, _ in labels
        ]
    # Metric by metric, so that each one's settings stand side by side.
    for metric in METRICS:
        for when, scored in (scores or {}).items():
            table[f"{metric} vs truth ({when})"] = [round(getattr(scored, metric)[name], 4) for name in names]
    return table


def against_all_on(table: pd.DataFrame, scan: Scan) -> str:
    """``**Against all skips on**: Anterior Dice 1.000, +0.000 mL, ...``"""
    change = change_column(scan)
    return "**Against all skips on**: " + ", ".join(
        f"{row['label']} Dice {row['Dice vs all skips on']:.3f}, {row[change]:+.3f} {scan.volume_unit}"
        for _, row in table.iterrows()
    )


def distance_caption(scores: Mapping[str, CaseScores], scan: Scan) -> str | None:
    """The unit of HD95 and NSD's tolerance, once masks were scored against a ground truth."""
    if "now" not in scores:
        return None
    return f"HD95 in {scan.unit}; NSD with a tolerance of {scores['now'].nsd_tolerance:g} {scan.unit}."


def mask_nifti(mask: np.ndarray, scan: Scan, label_names: Mapping[int, str]) -> bytes:
    """The mask as .nii.gz bytes with the scan's geometry."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mask.nii.gz"
        write_mask(mask, scan, path, dict(label_names))
        return path.read_bytes()


def table_csv(table: pd.DataFrame) -> str:
    text = io.StringIO()
    table.to_csv(text, index=False)
    return text.getvalue()
