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
from segment.app.extra_views import (
    compare_section,
    peer_section,
    uncertainty_section,
    view_3d_section,
    views_section,
)
from segment.app.metrics_table import (
    against_all_on,
    distance_caption,
    mask_nifti,
    metrics_table,
    table_csv,
)
from segment.app.page_state import (
    LOST_LEGEND,
    UNCERTAINTY_LEGEND,
    Case,
    Extras,
    Outcome,
    channel_choices,
    default_preset,
    difference_legend,
    mask_summary,
    model_choices,
    preset_window,
    skip_switches,
    training_notice,
    visible_planes,
    window_presets,
)
from segment.app.rendering import (
    DisplayVolume,
    Style,
    channel_windows,
    hex_colour,
    label_colour,
    plane_axis,
    plane_picture,
    rgb_colour,
)
from segment.app.session import registered_in, session_slot, shared_model
from segment.app.uploads import (
    EXAMPLE_CASE,
    LABEL_TYPES,
    SCAN_TYPES,
    Upload,
    accepted,
    digest,
    example_upload,
    read_upload,
    upload_names,
)

from segment.engine.metrics import CaseScores
from segment.errors import SegmentError
from segment.io import check_label_matches
from segment.models.sources import bundled_members, bundled_models
from segment.tracking.runs import RegisteredModel
from segment.tracking.store import resolve_tracking_uri
from segment.workflows import LoadedModel, explore

# Streamlit refuses a file over the upload limit in the browser and says why only to screen
# readers (a 1-pixel alert beside the file's red icon); this shows that sentence to everyone.
UPLOAD_ALERT_CSS = """<style>
[data-testid="stFileUploader"] span[role="alert"] {
  position: static !important; width: auto !important; height: auto !important;
  clip: auto !important; clip-path: none !important; overflow: visible !important;
  white-space: normal !important; margin: 0.25rem 0 0 !important; color: rgb(230, 25, 75);
}
</style>"""


def header_section() -> None:
    st.set_page_config(page_title="segment viewer", layout="wide")
    st.html(UPLOAD_ALERT_CSS)
    st.title("segment viewer")
    st.caption(
        "Upload a scan, see the predicted mask, switch long skip connections off and see the detail they carried."
    )


def registry_section(store: str) -> list[RegisteredModel]:
    registered, problem = registered_in(store)
    if problem:
        st.sidebar.caption(problem)
    return registered


def model_section(store: str, choices: dict[str, str]) -> tuple[str, LoadedModel]:
    """The model picker and what switching a skip off means for the chosen model."""
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
    return choice, model


def cached_upload(name: str, data: bytes, what: str, channels: int = 1) -> Upload:
    """The upload read once per content and channel count (slider moves rerun the page; another
    model may read another number of channels)."""
    return session_slot(what).get((digest(data), channels), lambda: read_upload(name, data, what, channels))


def use_example() -> None:
    st.session_state["_example"] = True


def scan_source() -> tuple[str, bytes]:
    """(name, bytes) of the scan: the upload, else the example once asked for; stops the page
    with the upload prompt until there is one."""
    scan_file = st.file_uploader(f"Scan ({accepted('scan')})", type=list(SCAN_TYPES), key="scan")
    if scan_file is not None:
        st.session_state.pop("_example", None)
        return scan_file.name, scan_file.getvalue()
    if st.session_state.get("_example"):
        return example_upload("scan")
    st.info("Upload a scan to begin, or try the example.")
    st.button("Try an example", key="try_example", on_click=use_example)
    st.caption(
        f"The example is {EXAMPLE_CASE} of the Medical Segmentation Decathlon's hippocampus task "
        "(CC-BY-SA 4.0, Vanderbilt University Medical Center), which the bundled models never trained on."
    )
    st.stop()


def upload_section(model: LoadedModel) -> tuple[Upload, np.ndarray | None, Upload | None]:
    """The scan (one channel per model input) and the optional ground truth; stops the page
    until a usable scan is there."""
    name, data = scan_source()
    truth_file = st.file_uploader(
        f"Ground-truth labels (optional; {accepted('labels')})", type=list(LABEL_TYPES), key="truth"
    )
    try:
        scan = cached_upload(name, data, "scan", model.config.model.in_channels)
    except SegmentError as error:
        st.error(str(error))
        st.stop()
    for warning in scan.scan.warnings:
        st.warning(upload_names(warning, scan))
    truth_source = (truth_file.name, truth_file.getvalue()) if truth_file is not None else None
    if truth_source is None and st.session_state.get("_example"):
        truth_source = example_upload("labels")
    truth, labels = None, None
    if truth_source is not None:
        try:
            labels = cached_upload(*truth_source, "labels")
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
                channel_windows(scan.scan.array),
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


def display_section(model: LoadedModel, case: Case) -> tuple[Style, int]:
    """How the pictures are drawn, and which channel of a multi-channel scan they show."""
    st.sidebar.subheader("Display")
    channel = channel_section(model)
    presets = window_presets()
    preset = st.sidebar.selectbox(
        "Intensity window", presets, index=default_preset(model.config), key="preset"
    )
    level, width = preset_window(preset, case.auto_windows[channel])
    if st.sidebar.checkbox("Manual level and width", key="manual_window"):
        level = st.sidebar.number_input("Level", value=float(level), key="window_level")
        width = st.sidebar.number_input("Width", value=float(width), min_value=1e-3, key="window_width")
    opacity = st.sidebar.slider("Mask opacity", 0.0, 1.0, 0.45, key="opacity")
    filled = st.sidebar.radio("Mask style", ["filled", "outline"], horizontal=True, key="style") == "filled"
    colours, hidden = label_section(model.config.label_names)
    return Style(float(level), float(width), opacity, filled, colours, hidden), channel


def channel_section(model: LoadedModel) -> int:
    """The channel drawn (0-based): picked when the model reads several, else the only one."""
    choices = channel_choices(model.config)
    if len(choices) == 1:
        return 0
    return choices.index(st.sidebar.selectbox("Channel shown", choices, key="channel"))


def label_section(label_names: dict[int, str]) -> tuple[dict[int, tuple[int, int, int]], frozenset[int]]:
    """One visibility switch and one colour per label: (colours, hidden labels)."""
    st.sidebar.subheader("Labels")
    colours, hidden = {}, set()
    for value, name in sorted(label_names.items()):
        if value == 0:
            continue
        shown, colour = st.sidebar.columns([3, 1], vertical_alignment="center")
        if not shown.checkbox(name, value=True, key=f"label_shown_{value}"):
            hidden.add(value)
        picked = colour.color_picker(
            f"{name} colour",
            hex_colour(label_colour(value)),
            key=f"label_colour_{value}",
            label_visibility="collapsed",
        )
        colours[value] = rgb_colour(picked)
    return colours, frozenset(hidden)


def decode_section(case: Case, skip_mask: tuple[bool, ...], built: tuple[bool, ...]) -> Outcome:
    with st.spinner("Decoding..."):
        reference = case.explorer.mask(built)
        mask = case.explorer.mask(skip_mask)
    return Outcome(skip_mask, built, mask, reference, case.explorer.compare(mask, reference))


def slice_section(display: DisplayVolume) -> tuple[int, int, int]:
    """The crosshair position (RAS voxel indices): one slider per axis longer than one voxel."""

    def index(plane: str) -> int:
        size = display.shape[plane_axis(plane)]
        if size == 1:
            return 0
        return st.sidebar.slider(f"{plane} slice", 0, size - 1, size // 2, key=f"slice_{plane}")

    return tuple(index(plane) for plane in ("sagittal", "coronal", "axial"))


def picture_row(display: DisplayVolume, position, style: Style, caption: str, **overlays) -> None:
    views = {name: None if array is None else display.same_view(array) for name, array in overlays.items()}
    planes = visible_planes(display.shape)
    for column, plane in zip(st.columns(len(planes)), planes, strict=True):
        column.image(
            plane_picture(display, plane, position, style, **views),
            caption=caption.format(plane=plane),
            width="stretch",
        )


def pictures_section(
    model: LoadedModel,
    display: DisplayVolume,
    outcome: Outcome,
    extra: Extras,
    position,
    style: Style,
) -> None:
    """The mask row, then the rows of what was asked for: the trained-without model, the
    lost/gained voxels once a skip is off, the compared model and where it differs, the
    uncertainty map; each over ``display``, the channel shown."""
    names = model.config.label_names
    st.markdown(mask_summary(outcome.skip_mask, names, style.colours, style.hidden), unsafe_allow_html=True)
    picture_row(display, position, style, "{plane}", labels=outcome.mask)
    if extra.peer is not None:
        st.markdown(f"**Trained without these skips**: {extra.peer.title}")
        picture_row(display, position, style, "{plane}: trained without", labels=extra.peer.mask)
    if outcome.switched:
        st.markdown(LOST_LEGEND, unsafe_allow_html=True)
        change = outcome.change
        picture_row(
            display, position, style, "{plane}: lost / gained", lost=change.lost, gained=change.gained
        )
    if extra.compared is not None:
        compared = extra.compared
        st.markdown(f"**Compared with** {compared.title}", unsafe_allow_html=True)
        picture_row(display, position, style, "{plane}: compared", labels=compared.mask)
        st.markdown(difference_legend("the model shown", compared.title), unsafe_allow_html=True)
        picture_row(
            display,
            position,
            style,
            "{plane}: differences",
            lost=compared.change.lost,
            gained=compared.change.gained,
        )
    if extra.uncertainty is not None:
        st.markdown(f"{UNCERTAINTY_LEGEND} Samples: {extra.uncertainty.source}.")
        picture_row(display, position, style, "{plane}: uncertainty", heat=extra.uncertainty.entropy)


def scores_against(
    case: Case, outcome: Outcome, extra: Extras, truth: np.ndarray | None, scan: Upload, labels
) -> dict[str, CaseScores]:
    """Each shown mask scored against the ground truth; none (and an error) when it does not fit."""
    if truth is None:
        return {}
    masks = {"now": outcome.mask, "all on": outcome.reference}
    if extra.peer is not None:
        masks["trained without"] = extra.peer.mask
    if extra.compared is not None:
        masks["compared"] = extra.compared.mask
    try:
        return {when: case.explorer.score(mask, truth) for when, mask in masks.items()}
    except SegmentError as error:
        st.error(upload_names(str(error), labels, scan))
        return {}


def metrics_section(
    model: LoadedModel,
    case: Case,
    outcome: Outcome,
    extra: Extras,
    truth: np.ndarray | None,
    scan: Upload,
    labels: Upload | None,
) -> pd.DataFrame:
    """The "Against all skips on" line, the metrics table and the unit of its distances."""
    names, volume = model.config.label_names, case.explorer.scan
    st.markdown(against_all_on(metrics_table(names, volume, outcome.mask, outcome.change), volume))
    scores = scores_against(case, outcome, extra, truth, scan, labels)
    entropy = extra.uncertainty.entropy if extra.uncertainty is not None else None
    table = metrics_table(
        names, volume, outcome.mask, outcome.change, extra.peer, scores, extra.compared, entropy
    )
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
    choices = model_choices(bundled_models(), registered, bundled_members())
    choice, model = model_section(store, choices)
    scan, truth, labels = upload_section(model)
    case = case_section(model, scan)
    skip_mask, built = skip_section(model, scan)
    outcome = decode_section(case, skip_mask, built)
    peer = peer_section(store, registered, model, scan, outcome, case)
    compared = compare_section(store, choices, choice, model, scan, case, outcome)
    show_uncertainty, show_3d = views_section()
    extra = Extras(peer, compared, uncertainty_section(case, outcome, show_uncertainty))
    style, channel = display_section(model, case)
    position = slice_section(case.display)
    pictures_section(model, case.display.channel(channel), outcome, extra, position, style)
    view_3d_section(model, case, outcome, style, scan, show_3d)
    table = metrics_section(model, case, outcome, extra, truth, scan, labels)
    downloads_section(model, case, outcome, table)


if __name__ == "__main__":
    main()
