"""The segment viewer: upload a scan, see the mask, switch long skips off, see what is lost.

Run with `make app` or `segment app`. Every model call goes through the segment library (the
same code as the CLI); what the page shows is computed by :mod:`segment.app.page_state` and
:mod:`segment.app.rendering` without Streamlit. The functions here only read widgets and lay
out what those return: :func:`main` calls one function per section of the page.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st
from segment.app.metrics_table import (
    PeerMask,
    against_all_on,
    distance_caption,
    mask_nifti,
    metrics_table,
    table_csv,
)
from segment.app.page_state import (
    LOST_LEGEND,
    Case,
    Outcome,
    Slot,
    Upload,
    default_preset,
    digest,
    mask_summary,
    model_choices,
    peer_for,
    preset_window,
    read_upload,
    skip_switches,
    train_without_hint,
    training_notice,
    upload_names,
    visible_planes,
    window_presets,
)
from segment.app.rendering import DisplayVolume, Style, auto_window, plane_axis, plane_picture

from segment.engine.metrics import CaseScores
from segment.engine.skip_explorer import SkipExplorer
from segment.errors import SegmentError
from segment.io import check_label_matches
from segment.models.sources import bundled_models
from segment.tracking.runs import RegisteredModel, registered_models
from segment.tracking.store import TrackingError, resolve_tracking_uri, use_store
from segment.workflows import LoadedModel, explore, load

REGISTRY_TTL_S = 30  # how often the registered models are read again


# --- shared across sessions ---------------------------------------------------------------------


@st.cache_data(ttl=REGISTRY_TTL_S, show_spinner=False)
def registered_in(store: str) -> tuple[list[RegisteredModel], str | None]:
    """MLflow's registered models and, when the store is unusable, none and why."""
    try:
        use_store(store)
        return registered_models(), None
    except TrackingError as error:  # an unreachable or broken store must not take the viewer down
        return [], f"MLflow models unavailable. {error}"


@st.cache_resource(show_spinner=False)
def shared_model(spec: str, store: str) -> LoadedModel:
    """One read-only model per spec and store for every session; skip masks are arguments."""
    return load(spec, tracking_uri=store)


def session_slot(name: str) -> Slot:
    """A :class:`Slot` of this browser session, kept across reruns."""
    return st.session_state.setdefault(f"_slot_{name}", Slot())


# --- one case: a scan under a model -------------------------------------------------------------


# --- sections -----------------------------------------------------------------------------------


def header_section() -> None:
    st.set_page_config(page_title="segment viewer", layout="wide")
    st.title("segment viewer")
    st.caption(
        "Upload a scan, see the predicted mask, switch long skip connections off and see the detail they carried."
    )


def registry_section(store: str) -> list[RegisteredModel]:
    registered, problem = registered_in(store)
    if problem:
        st.sidebar.caption(problem)
    return registered


def model_section(store: str, registered: list[RegisteredModel]) -> LoadedModel:
    """The model picker and what switching a skip off means for the chosen model."""
    choices = model_choices(bundled_models(), registered)
    if not choices:
        st.error("No model available: train one (`make train`) or restore the bundled models.")
        st.stop()
    choice = st.sidebar.selectbox("Model", list(choices), key="model")
    try:
        model = shared_model(choices[choice], store)
    except SegmentError as error:
        st.error(str(error))
        st.stop()
    notice = training_notice(model.config)
    getattr(st.sidebar, notice.kind)(notice.text)
    return model


def cached_upload(file, what: str) -> Upload:
    """The upload read once per content (slider moves rerun the page)."""
    data = file.getvalue()
    return session_slot(what).get(digest(data), lambda: read_upload(file.name, data, what))


def upload_section() -> tuple[Upload, np.ndarray | None, Upload | None]:
    """The scan and the optional ground truth; stops the page until a usable scan is uploaded."""
    scan_file = st.file_uploader("Scan (.nii or .nii.gz)", type=["nii", "gz"], key="scan")
    truth_file = st.file_uploader("Ground-truth labels (optional)", type=["nii", "gz"], key="truth")
    if scan_file is None:
        st.info("Upload a NIfTI scan to begin.")
        st.stop()
    try:
        scan = cached_upload(scan_file, "scan")
    except SegmentError as error:
        st.error(str(error))
        st.stop()
    for warning in scan.scan.warnings:
        st.warning(upload_names(warning, scan))
    truth, labels = None, None
    if truth_file is not None:
        try:
            labels = cached_upload(truth_file, "labels")
            check_label_matches(labels.scan, scan.scan)
            truth = labels.scan.array
        except SegmentError as error:
            st.error(upload_names(str(error), labels, scan))
    return scan, truth, labels


def case_section(model: LoadedModel, scan: Upload) -> Case:
    """This session's explorer of the scan under the model: segmented once, then cached."""

    def build() -> Case:
        with st.spinner("Segmenting..."):
            explorer = explore(model, scan.scan)
            explorer.mask()
            return Case(
                explorer,
                DisplayVolume.from_array(scan.scan.array, scan.scan.affine),
                auto_window(scan.scan.array),
            )

    try:
        return session_slot("case").get((scan.digest, model.spec), build)
    except SegmentError as error:  # usable as a file, not for this model (a 2D image for a 3D model)
        st.error(upload_names(str(error), scan))
        st.stop()


def skip_section(model: LoadedModel, scan: Upload) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
    """One switch per long skip, starting as the model was built: (the skip mask, the built one)."""
    st.sidebar.subheader("Long skip connections")
    built = tuple(model.network.resolve_skip_mask(None))
    skip_mask = tuple(
        st.sidebar.toggle(switch.label, value=switch.on, key=switch.key)
        for switch in skip_switches(model.config, scan.scan, built)
    )
    return skip_mask, built


def display_section(model: LoadedModel, case: Case) -> Style:
    st.sidebar.subheader("Display")
    presets = window_presets()
    preset = st.sidebar.selectbox(
        "Intensity window", presets, index=default_preset(model.config), key="preset"
    )
    level, width = preset_window(preset, case.auto_window)
    if st.sidebar.checkbox("Manual level and width", key="manual_window"):
        level = st.sidebar.number_input("Level", value=float(level), key="window_level")
        width = st.sidebar.number_input("Width", value=float(width), min_value=1e-3, key="window_width")
    opacity = st.sidebar.slider("Mask opacity", 0.0, 1.0, 0.45, key="opacity")
    filled = st.sidebar.radio("Mask style", ["filled", "outline"], horizontal=True, key="style") == "filled"
    return Style(float(level), float(width), opacity, filled)


def decode_section(case: Case, skip_mask: tuple[bool, ...], built: tuple[bool, ...]) -> Outcome:
    with st.spinner("Decoding..."):
        reference = case.explorer.mask(built)
        mask = case.explorer.mask(skip_mask)
    return Outcome(skip_mask, built, mask, reference, case.explorer.compare(mask, reference))


def peer_section(
    store: str,
    registered: list[RegisteredModel],
    model: LoadedModel,
    scan: Upload,
    outcome: Outcome,
    case: Case,
) -> PeerMask | None:
    """The fair comparison for switched-off skips: a model that never had them, when MLflow
    has one and the user asks for it side by side."""
    if not outcome.switched:
        return None
    peer = peer_for(registered, model.config, outcome.skip_mask, outcome.built)
    if peer is None:
        st.sidebar.caption(train_without_hint(outcome.skip_mask))
        return None
    if not st.sidebar.checkbox(f"Side by side: {peer.title}, trained without them", key="side_by_side"):
        return None
    try:
        peer_model = shared_model(peer.uri, store)

        def build() -> SkipExplorer:
            with st.spinner(f"Segmenting with {peer.name}..."):
                return explore(peer_model, scan.scan)

        # Like the main explorer, only the current scan's is kept: each caches its features.
        mask = session_slot("peer").get((scan.digest, peer.uri), build).mask()
    except SegmentError as error:
        st.error(upload_names(str(error), scan))
        return None
    return PeerMask(peer.title, mask, case.explorer.compare(mask, outcome.mask))


def slice_section(display: DisplayVolume) -> tuple[int, int, int]:
    """The crosshair position (RAS voxel indices): one slider per axis longer than one voxel."""

    def index(plane: str) -> int:
        size = display.data.shape[plane_axis(plane)]
        if size == 1:
            return 0
        return st.sidebar.slider(f"{plane} slice", 0, size - 1, size // 2, key=f"slice_{plane}")

    return tuple(index(plane) for plane in ("sagittal", "coronal", "axial"))


def picture_row(case: Case, position, style: Style, caption: str, **overlays) -> None:
    display = case.display
    views = {name: None if array is None else display.same_view(array) for name, array in overlays.items()}
    planes = visible_planes(display.data.shape)
    for column, plane in zip(st.columns(len(planes)), planes, strict=True):
        column.image(
            plane_picture(display, plane, position, style, **views),
            caption=caption.format(plane=plane),
            width="stretch",
        )


def pictures_section(
    model: LoadedModel, case: Case, outcome: Outcome, peer: PeerMask | None, position, style: Style
) -> None:
    """The mask row, the trained-without row and, once a skip is off, the lost/gained row."""
    st.markdown(mask_summary(outcome.skip_mask, model.config.label_names), unsafe_allow_html=True)
    picture_row(case, position, style, "{plane}", labels=outcome.mask)
    if peer is not None:
        st.markdown(f"**Trained without these skips**: {peer.title}")
        picture_row(case, position, style, "{plane}: trained without", labels=peer.mask)
    if outcome.switched:
        st.markdown(LOST_LEGEND, unsafe_allow_html=True)
        change = outcome.change
        picture_row(case, position, style, "{plane}: lost / gained", lost=change.lost, gained=change.gained)


def scores_against(
    case: Case, outcome: Outcome, peer: PeerMask | None, truth: np.ndarray | None, scan: Upload, labels
) -> dict[str, CaseScores]:
    """Each shown mask scored against the ground truth; none (and an error) when it does not fit."""
    if truth is None:
        return {}
    masks = {"now": outcome.mask, "all on": outcome.reference}
    if peer is not None:
        masks["trained without"] = peer.mask
    try:
        return {when: case.explorer.score(mask, truth) for when, mask in masks.items()}
    except SegmentError as error:
        st.error(upload_names(str(error), labels, scan))
        return {}


def metrics_section(
    model: LoadedModel,
    case: Case,
    outcome: Outcome,
    peer: PeerMask | None,
    truth: np.ndarray | None,
    scan: Upload,
    labels: Upload | None,
) -> pd.DataFrame:
    """The "Against all skips on" line, the metrics table and the unit of its distances."""
    names, volume = model.config.label_names, case.explorer.scan
    st.markdown(against_all_on(metrics_table(names, volume, outcome.mask, outcome.change, peer), volume))
    scores = scores_against(case, outcome, peer, truth, scan, labels)
    table = metrics_table(names, volume, outcome.mask, outcome.change, peer, scores)
    st.dataframe(table, hide_index=True)
    caption = distance_caption(scores, volume)
    if caption:
        st.caption(caption)
    return table


def downloads_section(model: LoadedModel, case: Case, outcome: Outcome, table: pd.DataFrame) -> None:
    left, right = st.columns(2)
    left.download_button(
        "Download mask (NIfTI)",
        mask_nifti(outcome.mask, case.explorer.scan, model.config.label_names),
        file_name="mask.nii.gz",
        mime="application/gzip",
        key="download_mask",
    )
    right.download_button(
        "Download volumes and metrics (CSV)",
        table_csv(table),
        file_name="metrics.csv",
        mime="text/csv",
        key="download_csv",
    )


def main() -> None:
    header_section()
    store = resolve_tracking_uri()
    registered = registry_section(store)
    model = model_section(store, registered)
    scan, truth, labels = upload_section()
    case = case_section(model, scan)
    skip_mask, built = skip_section(model, scan)
    style = display_section(model, case)
    outcome = decode_section(case, skip_mask, built)
    peer = peer_section(store, registered, model, scan, outcome, case)
    position = slice_section(case.display)
    pictures_section(model, case, outcome, peer, position, style)
    table = metrics_section(model, case, outcome, peer, truth, scan, labels)
    downloads_section(model, case, outcome, table)


if __name__ == "__main__":
    main()
