"""``ensemble`` and ``export``: trained models joined into one, or copied into a folder of
their own (weights and config, nothing else) or into one ONNX or TorchScript file, to ship or
use without the MLflow store."""

from __future__ import annotations

from pathlib import Path

import torch

from segment.atomic import require_new_folder, require_output_file
from segment.errors import InputError
from segment.models import export_model, load_members, load_model, save_ensemble
from segment.models.graph_export import FORMATS, export_graph
from segment.models.sources import resolve_model


def ensemble(models: list[str], output: str | Path, *, float16: bool = False, tracking_uri: str | None = None) -> Path:
    """Join two or more trained models of one task (bundled names, MLflow URIs or folders)
    into an ensemble folder: it predicts the mean of their softmax outputs, and a skip mask
    switches the same skips off in every member. ``float16`` halves the weights' size."""
    output = Path(output)
    if len(models) < 2:
        raise InputError("An ensemble needs at least two models.")
    require_new_folder(output, "the ensemble")
    members = []
    for spec in models:
        loaded = load_members(resolve_model(spec, tracking_uri))
        if len(loaded) > 1:
            raise InputError(f"{spec} is an ensemble already; list its members instead.")
        members += loaded
    return save_ensemble(members, output, torch.float16 if float16 else None)


def export(
    model: str,
    output: str | Path,
    *,
    format: str = "folder",
    float16: bool = False,
    tracking_uri: str | None = None,
) -> Path:
    """Copy ``model`` (an ensemble too) into the new folder ``output``, which appears whole or
    not at all; ``float16`` stores the weights in half precision. ``format`` ``onnx`` or
    ``torchscript`` writes one standalone graph file instead, the skip mask one of its inputs
    (:mod:`segment.models.graph_export`)."""
    output = Path(output)
    if format == "folder":
        require_new_folder(output, "the model")
        return export_model(resolve_model(model, tracking_uri), output, torch.float16 if float16 else None)
    if format not in FORMATS:
        raise InputError(f"--format {format}: use folder, {' or '.join(FORMATS)}.")
    if float16:
        raise InputError("--float16 halves a model folder's weights; a graph file is exported in float32.")
    require_output_file(output, f"the {format} file")
    network, config = load_model(resolve_model(model, tracking_uri))
    return export_graph(network, config, format, output)
