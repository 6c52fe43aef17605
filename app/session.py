"""What the viewer keeps across reruns: the models and the MLflow registry, shared by every
browser session, and the values one session keeps for its scan."""

from __future__ import annotations

import streamlit as st
from segment.app.page_state import Slot

from segment.tracking.runs import RegisteredModel, registered_models
from segment.tracking.store import TrackingError, use_store
from segment.workflows import LoadedModel, load

REGISTRY_TTL_S = 30  # how often the registered models are read again


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
