"""The views shown beside the mask when the user asks for them: the model trained without the
switched-off skips, a second model compared, the uncertainty map and the 3D surfaces. Page
functions like :mod:`segment.app.viewer`'s, which calls them."""

from __future__ import annotations

import numpy as np
import streamlit as st
from segment.app.metrics_table import PeerMask
from segment.app.page_state import (
    NO_COMPARISON,
    Case,
    Outcome,
    compare_choices,
    incomparable,
    peer_for,
    train_without_hint,
)
from segment.app.rendering import Style, hex_colour
from segment.app.session import session_slot, shared_model
from segment.app.surfaces import label_surfaces
from segment.app.uploads import Upload, upload_names

from segment.engine.skip_explorer import SkipExplorer, UncertaintyMap
from segment.errors import SegmentError
from segment.tracking.runs import RegisteredModel
from segment.workflows import LoadedModel, explore


def other_mask(slot: str, other: LoadedModel, title: str, scan: Upload) -> np.ndarray:
    """``other``'s mask of the scan, its explorer kept in this session's ``slot``: like the main
    explorer, only the current scan's is kept, since each caches its features."""

    def build() -> SkipExplorer:
        with st.spinner(f"Segmenting with {title}..."):
            return explore(other, scan.scan)

    return session_slot(slot).get((scan.digest, other.spec), build).mask()


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
        mask = other_mask("peer", shared_model(peer.uri, store), peer.name, scan)
    except SegmentError as error:
        st.error(upload_names(str(error), scan))
        return None
    return PeerMask(peer.title, mask, case.explorer.compare(mask, outcome.mask))


def compare_section(
    store: str,
    choices: dict[str, str],
    choice: str,
    model: LoadedModel,
    scan: Upload,
    case: Case,
    outcome: Outcome,
) -> PeerMask | None:
    """Any second model's mask of the scan, beside the one shown, with the voxels where they differ."""
    st.sidebar.subheader("Compare")
    other = st.sidebar.selectbox("Compare with", compare_choices(choices, choice), key="compare")
    if other == NO_COMPARISON:
        return None
    try:
        other_model = shared_model(choices[other], store)
        problem = incomparable(model.config, other_model.config)
        if problem:
            st.sidebar.warning(problem)
            return None
        mask = other_mask("compare", other_model, other, scan)
    except SegmentError as error:
        st.error(upload_names(str(error), scan))
        return None
    return PeerMask(other, mask, case.explorer.compare(mask, outcome.mask))


def views_section() -> tuple[bool, bool]:
    """Whether to show the uncertainty map and the 3D view."""
    st.sidebar.subheader("Views")
    return st.sidebar.toggle("Uncertainty map", key="uncertainty"), st.sidebar.toggle(
        "3D view", key="view_3d"
    )


def uncertainty_section(case: Case, outcome: Outcome, wanted: bool) -> UncertaintyMap | None:
    if not wanted:
        return None
    with st.spinner("Sampling the model..."):
        return case.explorer.uncertainty(outcome.skip_mask)


def view_3d_section(
    model: LoadedModel, case: Case, outcome: Outcome, style: Style, scan: Upload, wanted: bool
) -> None:
    """Each shown label's surface, in the user's colours, to rotate in the browser."""
    if not wanted:
        return
    names = model.config.label_names
    colours = {value: hex_colour(colour) for value, colour in style.colours.items()}
    shown = [value for value in names if value > 0 and value not in style.hidden]
    key = (scan.digest, model.spec, outcome.skip_mask, tuple(sorted(colours.items())), tuple(shown))
    figure = session_slot("surfaces").get(
        key,
        lambda: label_surfaces(
            outcome.mask, case.explorer.scan.affine, names, colours, shown, unit=case.explorer.scan.unit
        ),
    )
    st.markdown("**3D view**: drag to rotate, scroll to zoom; click a label in the legend to hide it.")
    st.plotly_chart(figure, key="surfaces")
