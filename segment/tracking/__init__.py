"""MLflow: the store and what a run records (:mod:`segment.tracking.store`), and queries over
the runs and models it holds (:mod:`segment.tracking.runs`)."""
