"""The Streamlit viewer, installed as ``segment.app`` (``segment app`` starts it)."""
