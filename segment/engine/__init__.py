"""Training, inference and evaluation loops."""
