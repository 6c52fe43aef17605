"""Loading a model from any source (a bundled name, an MLflow URI, a folder) onto a device,
and exploring its long skips on one scan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from segment.config import ExperimentConfig
from segment.engine.device import Runtime, make_runtime
from segment.engine.skip_explorer import SkipExplorer
from segment.io import Scan, read_scan
from segment.models import Segmenter, UNet, as_segmenter, load_members
from segment.models.sources import resolve_model


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: one U-Net or an ensemble, on its device, in eval mode.

    ``config`` is the (first) member's; ``members`` keeps each member's own training recipe."""

    spec: str
    network: Segmenter
    config: ExperimentConfig
    members: list[tuple[UNet, ExperimentConfig]]
    runtime: Runtime

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1


def load(model: str, *, tracking_uri: str | None = None, device: str = "auto") -> LoadedModel:
    """``model``: a bundled name (``hippocampus_3d``), an MLflow URI (``models:/NAME@best``,
    ``runs:/ID/...``) or a model folder; ``device``: auto, cpu or cuda."""
    members = load_members(resolve_model(model, tracking_uri))
    network, config = as_segmenter(members)
    runtime = make_runtime(device, config.trainer.amp, config.trainer.channels_last)
    return LoadedModel(model, runtime.prepare_model(network).eval(), config, members, runtime)


def explore(model: LoadedModel, scan: Scan | str | Path) -> SkipExplorer:
    """``scan`` (a read :class:`Scan` or a file) under ``model``, ready for any skip mask:
    ``explorer.mask((1, 0, 1, 1))`` re-runs only the decoder on the cached encoder output."""
    scan = scan if isinstance(scan, Scan) else read_scan(scan, model.config.model.in_channels)
    return SkipExplorer(model.network, model.config, scan, model.runtime)
