"""The callbacks that write to the active MLflow run: an epoch's metrics, and at the end of a
completed run its figures and the registered model.

A store that fails mid-run (a server stopped, a SQLite file another writer holds locked, a full
disk under it) does not stop the training: the metrics wait for a later epoch, in memory and
in the run's folder (so that a stopped run's resume logs them), and what is still not logged
when the run ends is named in one sentence."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np

from segment import plots
from segment.atomic import write_atomically
from segment.engine.inference import predict_logits
from segment.models import load_model
from segment.tracking import store
from segment.tracking.store import STORE_FAILURES, TrackingError, failure_reason
from segment.training.callbacks import Callback, EpochEnd
from segment.training.checkpoint import CHECKPOINT_FILE, TrainingState
from segment.training.setup import TrainingSetup

# Printed bare on stderr (Python's last-resort handler) unless the application sets up logging.
log = logging.getLogger(__name__)

# After the store fails, the metrics wait this long before the next try, twice as long after
# each failure that follows, up to the longest pause: a try can block for a while (SQLite
# waits 20 s for a lock, a server is retried for seconds), and an epoch can take one second.
FIRST_PAUSE_SECONDS = 30.0
LONGEST_PAUSE_SECONDS = 600.0
# The metrics the store has not taken yet, in the run's folder beside its checkpoint.
UNLOGGED_FILE = "unlogged_metrics.json"


class MetricsLogger(Callback):
    """Logs each epoch's metrics at step = epochs done, after the checkpoint is written.

    Metrics the store does not take wait in :attr:`unlogged` and go, in epoch order, with a
    later epoch's once a pause has passed, and at the end of the run in any case; the store's
    first failure and its recovery are told in one line each. While any wait, they are also in
    ``run_dir``'s :data:`UNLOGGED_FILE`, which the resumed run logs first: a run stopped, or
    ended, while the store was down loses no epoch's figures."""

    def __init__(self, state: TrainingState, run_dir: Path) -> None:
        self._state = state
        self._file = run_dir / UNLOGGED_FILE
        self.unlogged: dict[int, tuple[int, dict[str, float]]] = {}  # epoch: (time in ms, metrics)
        if self._file.is_file():
            held = json.loads(self._file.read_text())
            self.unlogged = {int(epoch): (timestamp, metrics) for epoch, (timestamp, metrics) in held.items()}
        self.failure: str | None = None  # why the store last failed; None while it works
        self._pause = FIRST_PAUSE_SECONDS
        self._next_try = 0.0  # time.monotonic() from which the store is tried again

    def on_epoch_end(self, end: EpochEnd) -> None:
        metrics = end.metrics | {"epoch": end.epoch, "train_minutes": self._state.elapsed_seconds / 60}
        if self._state.best_mean_dice >= 0:  # -1 until the first validation
            metrics["best_val_mean_dice"] = self._state.best_mean_dice
        self.unlogged[end.epoch] = (int(time.time() * 1000), metrics)
        if time.monotonic() >= self._next_try:
            self._log_unlogged()
        self._keep_unlogged()

    def on_fit_end(self, stop_reason: str) -> None:
        if self.unlogged:
            self._log_unlogged()
            self._keep_unlogged()

    def _keep_unlogged(self) -> None:
        if self.unlogged:
            text = json.dumps({str(epoch): held for epoch, held in self.unlogged.items()})
            write_atomically(self._file, lambda temporary: temporary.write_text(text))
        else:
            self._file.unlink(missing_ok=True)

    def _log_unlogged(self) -> None:
        waiting = epochs_text(list(self.unlogged))
        try:
            for epoch in sorted(self.unlogged):
                timestamp, metrics = self.unlogged[epoch]
                mlflow.log_metrics(metrics, step=epoch, timestamp=timestamp)
                del self.unlogged[epoch]
        except STORE_FAILURES as error:
            if self.failure is None:
                log.warning(
                    f"Warning: the MLflow store {mlflow.get_tracking_uri()} did not take the metrics of "
                    f"{waiting} ({failure_reason(error)}); training goes on, and they are logged once "
                    "it answers again."
                )
            self.failure = failure_reason(error)
            self._next_try = time.monotonic() + self._pause
            self._pause = min(2 * self._pause, LONGEST_PAUSE_SECONDS)
            return
        if self.failure is not None:
            log.warning(f"The MLflow store answers again: the metrics of {waiting} are logged.")
        self.failure, self._pause = None, FIRST_PAUSE_SECONDS


def epochs_text(epochs: list[int]) -> str:
    """``epoch 3``, ``epochs 2-4``, ``epochs 1, 3-5 and 7``."""
    runs: list[list[int]] = []
    for epoch in sorted(epochs):
        if runs and epoch == runs[-1][-1] + 1:
            runs[-1].append(epoch)
        else:
            runs.append([epoch])
    listed = listing([str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs])
    return f"epoch {listed}" if len(epochs) == 1 else f"epochs {listed}"


def listing(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


class FinalReport(Callback):
    """Learning curves, an overlay of the best model on a validation case, and the best model
    logged and registered; ``version`` is the registered version (None without a best model).

    Runs after ``metrics`` (the run's :class:`MetricsLogger`) has logged what it still held. If
    the store fails, what was not logged is named in one :class:`TrackingError`, with where the
    model and the checkpoint are; the run resumed with no epochs left logs the figures and the
    model."""

    def __init__(
        self,
        setup: TrainingSetup,
        state: TrainingState,
        val_cases,
        best_dir: Path,
        metrics: MetricsLogger,
    ) -> None:
        self._setup, self._state, self._val_cases, self._best_dir = setup, state, val_cases, best_dir
        self._metrics = metrics
        self.version: int | None = None

    def on_fit_end(self, stop_reason: str) -> None:
        steps: list[tuple[str, Callable[[], None]]] = [("the learning curves", self._log_learning_curves)]
        if self._best_dir.is_dir():
            steps += [("the validation overlay", self._log_overlay), ("the model", self._register)]
        waiting = self._metrics.unlogged
        # Metrics still waiting mean that the store failed a moment ago: no step is tried, each
        # would wait on it again.
        failure = self._metrics.failure if waiting else None
        done = 0
        while failure is None and done < len(steps):
            try:
                steps[done][1]()
                done += 1
            except STORE_FAILURES as error:
                failure = failure_reason(error)
        unlogged = [f"the metrics of {epochs_text(list(waiting))}"] if waiting else []
        unlogged += [what for what, _ in steps[done:]]
        if unlogged:
            raise TrackingError(self._unlogged_sentence(unlogged, failure))

    def _unlogged_sentence(self, unlogged: list[str], failure: str) -> str:
        run_dir = self._best_dir.parent
        kept = f"the checkpoint is in {run_dir / CHECKPOINT_FILE}"
        if self._best_dir.is_dir():
            kept = f"the best model is in {self._best_dir} and the checkpoint in {run_dir / CHECKPOINT_FILE}"
        return (
            f"Training finished, but the MLflow store {mlflow.get_tracking_uri()} did not take "
            f"{listing(unlogged)} ({failure}); {kept}, and once the store answers, "
            f"segment train --resume {self._state.run_id} --output-dir {run_dir.parent} logs them."
        )

    def _log_learning_curves(self) -> None:
        keys = ["train_loss", "val_mean_dice", *(f"val_dice_{name}" for name in self._state.best_dice)]
        history = store.metric_histories(self._state.run_id, keys)
        with plots.released(plots.learning_curves(history)) as figure:
            mlflow.log_figure(figure, "learning_curves.png")

    def _log_overlay(self) -> None:
        runtime = self._setup.runtime
        model, config = load_model(self._best_dir)
        model = runtime.prepare_model(model)
        case = self._val_cases[0]
        image, label = case["image"], np.asarray(case["label"][0])
        masks = {"ground truth": label}
        for title, skip_mask in (("prediction", None), ("prediction, all skips off", [0] * model.num_skips)):
            logits = predict_logits(model, image[None], runtime, config, skip_mask)
            masks[title] = logits.argmax(dim=1)[0].numpy()
        index = plots.busiest_slice(label)
        figure = plots.overlay_panels(
            np.asarray(image[0])[..., index],
            {k: v[..., index] for k, v in masks.items()},
            config.label_names,
        )
        with plots.released(figure):
            mlflow.log_figure(figure, "validation_overlay.png")

    def _register(self) -> None:
        self.version = store.log_model_and_register(
            self._best_dir, self._setup.config, {"val_mean_dice": self._state.best_mean_dice}
        )
