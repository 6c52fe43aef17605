"""The segment viewer: upload a scan, see the mask, switch long skips off, see what is lost.

Run with `make app` or `segment app`. Every model call goes through the segment library (the
same code as the CLI); this page only arranges widgets and pictures.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image
from rendering import (
    AUTO_PRESET,
    CT_PRESETS,
    PLANES,
    DisplayVolume,
    auto_window,
    compose,
    crosshair,
    display_size,
    label_colour,
    plane_axis,
    plane_pixel_mm,
    plane_slice,
    window,
)

from segment import tracking
from segment.engine.device import make_runtime
from segment.engine.explore import SkipExplorer
from segment.io import ScanError, read_scan, write_mask
from segment.models import ModelLoadError, load_model
from segment.models.sources import bundled_models, resolve_model

NIFTI_NAMES = (".nii", ".nii.gz")

st.set_page_config(page_title="segment viewer", layout="wide")


@st.cache_data(ttl=30, show_spinner=False)
def registered_models_in(store: str) -> list[dict]:
    """MLflow's registered models (re-read every 30 s), or none when the store is unusable."""
    try:
        tracking.use_store(store)
        return tracking.registered_models()
    except Exception as error:  # an unreachable or broken store must not take the viewer down
        st.sidebar.caption(f"MLflow models unavailable: {error.__class__.__name__}")
        return []


def registered_models() -> list[dict]:
    return registered_models_in(tracking.resolve_tracking_uri())


def entry_title(entry: dict) -> str:
    dice = "" if entry["val_mean_dice"] is None else f", val Dice {entry['val_mean_dice']:.3f}"
    return f"{entry['name']} v{entry['version']} ({entry['task']}{dice})"


def model_choices() -> dict[str, str]:
    """Display name -> model spec: bundled models first, then MLflow's registered models."""
    choices = {f"{name} (bundled)": name for name in bundled_models()}
    choices |= {entry_title(entry): entry["uri"] for entry in registered_models()}
    return choices


@st.cache_resource(show_spinner=False)
def loaded_model_from(spec: str, store: str):
    """One shared, read-only model per spec and store for every session; skip masks are arguments."""
    model, config = load_model(resolve_model(spec, store))
    runtime = make_runtime("auto", config.trainer.amp, config.trainer.channels_last)
    return runtime.prepare_model(model).eval(), config, runtime


def loaded_model(spec: str):
    return loaded_model_from(spec, tracking.resolve_tracking_uri())


def read_upload(upload, what: str):
    """The uploaded bytes as a Scan, parsed once per upload (slider moves rerun this page).

    The file is written under a name we choose: the uploaded name is only checked, never used
    as a path."""
    name = upload.name.lower()
    if not name.endswith(NIFTI_NAMES):
        raise ScanError(f"The {what} {upload.name!r} is not a NIfTI file; upload .nii or .nii.gz.")
    data = upload.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    parsed = st.session_state.setdefault("parsed_uploads", {})
    if parsed.get(what, (None, None))[0] != digest:
        suffix = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{what}{suffix}"
            path.write_bytes(data)
            try:
                parsed[what] = (digest, read_scan(path))
            except ScanError as error:
                # The message should name the file the user chose, not our temporary copy.
                raise ScanError(str(error).replace(path.name, upload.name)) from None
    return parsed[what][1], digest


def level_labels(config, scan) -> list[str]:
    """``level 1 - full resolution, 1 mm`` ... for each long skip, in the scan's unit."""
    # A 2D model pools within the axial slice only.
    spacing = (config.data.spacing or scan.spacing)[: config.model.spatial_dims]
    labels = []
    for level in range(1, config.model.levels):
        factor = 2 ** (level - 1)
        size = (
            " x ".join(f"{s * factor:g}" for s in spacing)
            if len(set(spacing)) > 1
            else f"{spacing[0] * factor:g}"
        )
        scale = "full resolution" if level == 1 else f"1/{factor} resolution"
        labels.append(f"level {level} - {scale}, {size} {scan.unit}")
    return labels


def mask_download(mask: np.ndarray, scan, label_names) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mask.nii.gz"
        write_mask(mask, scan, path, label_names)
        return path.read_bytes()


st.title("segment viewer")
st.caption(
    "Upload a scan, see the predicted mask, switch long skip connections off and see the detail they carried."
)

choices = model_choices()
if not choices:
    st.error("No model available: train one (`make train`) or restore the bundled models.")
    st.stop()
choice = st.sidebar.selectbox("Model", list(choices), key="model")
try:
    model, config, runtime = loaded_model(choices[choice])
except ModelLoadError as error:
    st.error(str(error))
    st.stop()
dropout = max(config.model.skip_dropout_per_level)
if config.model.skips is not None and not all(config.model.skips):
    st.sidebar.info("This model was trained without some long skips; its switches start in that state.")
elif dropout > 0:
    st.sidebar.success(
        f"Trained with skip dropout {dropout:g}: switching skips off stays close to what it saw in training."
    )
else:
    st.sidebar.warning(
        "Trained without skip dropout: a switched-off skip feeds the decoder zeros it never saw, "
        "so the loss shown exaggerates what the skip carries."
    )

upload = st.file_uploader("Scan (.nii or .nii.gz)", type=["nii", "gz"], key="scan")
truth_upload = st.file_uploader("Ground-truth labels (optional)", type=["nii", "gz"], key="truth")
if upload is None:
    st.info("Upload a NIfTI scan to begin.")
    st.stop()
try:
    scan, digest = read_upload(upload, "scan")
except ScanError as error:
    st.error(str(error))
    st.stop()
for warning in scan.warnings:
    st.warning(warning)
truth = None
if truth_upload is not None:
    try:
        label_scan, _ = read_upload(truth_upload, "labels")
        if label_scan.array.shape != scan.array.shape or not np.allclose(
            label_scan.affine, scan.affine, atol=1e-3
        ):
            raise ScanError(
                "The ground truth's shape or affine differs from the scan's; upload the labels of this scan."
            )
        truth = label_scan.array
    except ScanError as error:
        st.error(str(error))

# One explorer per session, scan and model: it caches the encoder output and every mask.
key = (digest, choices[choice])
if st.session_state.get("explorer_key") != key:
    with st.spinner("Segmenting..."):
        try:
            st.session_state["explorer"] = SkipExplorer(model, config, scan, runtime)
        except ScanError as error:  # usable as a file, not for this model (a 2D image for a 3D model)
            st.error(str(error).replace(scan.path.name, upload.name))
            st.stop()
        st.session_state["explorer"].mask()
        # Display orientation and the auto window depend on the scan only: not per rerun.
        st.session_state["display"] = DisplayVolume.from_array(scan.array, scan.affine)
        st.session_state["auto_window"] = auto_window(scan.array)
    st.session_state["explorer_key"] = key
explorer: SkipExplorer = st.session_state["explorer"]
display: DisplayVolume = st.session_state["display"]

st.sidebar.subheader("Long skip connections")
default_skips = model.resolve_skips(None)
skips = tuple(
    st.sidebar.toggle(label, value=default_skips[level], key=f"skip_{level}")
    for level, label in enumerate(level_labels(config, scan))
)
st.sidebar.subheader("Display")
label_names = config.label_names
presets = [AUTO_PRESET, *CT_PRESETS]
preset = st.sidebar.selectbox(
    "Intensity window", presets, index=1 if config.data.modality == "ct" else 0, key="preset"
)
level, width = CT_PRESETS.get(preset) or st.session_state["auto_window"]
if st.sidebar.checkbox("Manual level and width", key="manual_window"):
    level = st.sidebar.number_input("Level", value=float(level), key="level")
    width = st.sidebar.number_input("Width", value=float(width), min_value=1e-3, key="width")
opacity = st.sidebar.slider("Mask opacity", 0.0, 1.0, 0.45, key="opacity")
filled = st.sidebar.radio("Mask style", ["filled", "outline"], horizontal=True, key="style") == "filled"

with st.spinner("Decoding..."):
    reference = explorer.mask(default_skips)
    mask = explorer.mask(skips)
change = explorer.compare(mask, reference)

# The fair comparison for a switched-off skip: a model that never had it, when MLflow has one.
peer_mask, peer_title = None, None
if skips != tuple(default_skips):
    peers = tracking.trained_without(
        registered_models(), config.data.task, config.model.spatial_dims, tuple(int(s) for s in skips)
    )
    if not peers:
        st.sidebar.caption(
            "No registered model was trained without these skips; train one with "
            f"`--set model.skips=[{','.join(str(int(s)) for s in skips)}] model.skip_dropout=0`."
        )
    elif st.sidebar.checkbox(
        f"Side by side: {entry_title(peers[0])}, trained without them", key="side_by_side"
    ):
        peer_spec, peer_title = peers[0]["uri"], entry_title(peers[0])
        try:
            peer_model, peer_config, peer_runtime = loaded_model(peer_spec)
            # Like the main explorer, only the current scan's is kept: each caches its features.
            if st.session_state.get("peer_explorer_key") != (digest, peer_spec):
                with st.spinner(f"Segmenting with {peers[0]['name']}..."):
                    st.session_state["peer_explorer"] = SkipExplorer(
                        peer_model, peer_config, scan, peer_runtime
                    )
                st.session_state["peer_explorer_key"] = (digest, peer_spec)
            peer_mask = st.session_state["peer_explorer"].mask()
        except ModelLoadError as error:
            st.error(str(error))

volume = display.data
views = {
    "mask": display.same_view(mask),
    "lost": display.same_view(change.lost),
    "gained": display.same_view(change.gained),
}
# A single 2D slice (an EM image) has one picture worth showing and no slice to choose.
planes = [
    plane
    for plane in PLANES
    if all(size > 1 for axis, size in enumerate(volume.shape) if axis != plane_axis(plane))
] or list(PLANES)


def slice_index(plane: str) -> int:
    size = volume.shape[plane_axis(plane)]
    if size == 1:
        return 0
    return st.sidebar.slider(f"{plane} slice", 0, size - 1, size // 2, key=f"slice_{plane}")


position = tuple(slice_index(plane) for plane in ("sagittal", "coronal", "axial"))

legend = " ".join(
    f"<span style='color:rgb{label_colour(value)}'>&#9632;</span> {name}"
    for value, name in sorted(label_names.items())
    if value > 0
)
st.markdown(f"**Mask** ({'skips ' + ''.join(str(int(s)) for s in skips)}): {legend}", unsafe_allow_html=True)


def render(plane: str, labels: np.ndarray | None, lost=None, gained=None) -> Image.Image:
    index = position[plane_axis(plane)]
    grey = window(plane_slice(volume, plane, index), level, width)
    picture = compose(
        grey,
        None if labels is None else plane_slice(labels, plane, index),
        opacity,
        filled,
        crosshair(plane, position, volume.shape),
        None if lost is None else plane_slice(lost, plane, index),
        None if gained is None else plane_slice(gained, plane, index),
    )
    size = display_size(grey.shape, plane_pixel_mm(plane, display.spacing))
    return Image.fromarray(picture).resize(size, Image.NEAREST)


for column, plane in zip(st.columns(len(planes)), planes, strict=True):
    column.image(render(plane, views["mask"]), caption=plane, width="stretch")

if peer_mask is not None:
    st.markdown(f"**Trained without these skips**: {peer_title}")
    peer_view = display.same_view(peer_mask)
    for column, plane in zip(st.columns(len(planes)), planes, strict=True):
        column.image(render(plane, peer_view), caption=f"{plane}: trained without", width="stretch")

if any(s != d for s, d in zip(skips, default_skips, strict=True)):
    st.markdown(
        "**Lost detail**: <span style='color:rgb(230,25,75)'>&#9632;</span> labelled with every skip on, not now; "
        "<span style='color:rgb(66,212,244)'>&#9632;</span> labelled now, not with every skip on.",
        unsafe_allow_html=True,
    )
    for column, plane in zip(st.columns(len(planes)), planes, strict=True):
        column.image(
            render(plane, None, views["lost"], views["gained"]),
            caption=f"{plane}: lost / gained",
            width="stretch",
        )

rows = []
in_unit = f"({scan.volume_unit})"
for value, name in sorted(label_names.items()):
    if value == 0:
        continue
    rows.append(
        {
            "label": name,
            f"volume {in_unit}": round(float((mask == value).sum()) * scan.voxel_volume, 4),
            f"change vs all skips on {in_unit}": round(change.volume_change[name], 4),
            "Dice vs all skips on": round(change.dice_to_reference[name], 4),
        }
    )
table = pd.DataFrame(rows)
if peer_mask is not None:
    peer_change = explorer.compare(peer_mask, mask)
    table[f"volume, trained without {in_unit}"] = [
        round(float((peer_mask == value).sum()) * scan.voxel_volume, 4)
        for value, name in sorted(label_names.items())
        if value > 0
    ]
    table["Dice, switched off vs trained without"] = [
        round(peer_change.dice_to_reference[name], 4) for name in table["label"]
    ]
st.markdown(
    "**Against all skips on**: "
    + ", ".join(
        f"{row['label']} Dice {row['Dice vs all skips on']:.3f}, "
        f"{row[f'change vs all skips on {in_unit}']:+.3f} {scan.volume_unit}"
        for row in rows
    )
)
if truth is not None:
    try:
        scored = {"now": explorer.score(mask, truth), "all on": explorer.score(reference, truth)}
        if peer_mask is not None:
            scored["trained without"] = explorer.score(peer_mask, truth)
    except ScanError as error:
        st.error(str(error))
        scored = {}
    # Metric by metric, so that each one's settings stand side by side.
    for metric in ("dice", "hd95", "nsd"):
        for when, scores in scored.items():
            table[f"{metric} vs truth ({when})"] = [
                round(getattr(scores, metric)[name], 4) for name in table["label"]
            ]
st.dataframe(table, hide_index=True)
if truth is not None and scored:
    tolerance = scored["now"].nsd_tolerance
    st.caption(f"HD95 in {scan.unit}; NSD with a tolerance of {tolerance:g} {scan.unit}.")

left, right = st.columns(2)
left.download_button(
    "Download mask (NIfTI)",
    mask_download(mask, scan, label_names),
    file_name="mask.nii.gz",
    mime="application/gzip",
    key="download_mask",
)
csv = io.StringIO()
table.to_csv(csv, index=False)
right.download_button(
    "Download volumes and metrics (CSV)",
    csv.getvalue(),
    file_name="metrics.csv",
    mime="text/csv",
    key="download_csv",
)
