"""The callbacks that write to the active MLflow run: an epoch's metrics, and at the end of a
completed run its figures and the registered model."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np

from segment import plots
from segment.engine.inference import predict_logits
from segment.models import load_model
from segment.tracking import store
from segment.training.callbacks import Callback, EpochEnd
from segment.training.checkpoint import TrainingState
from segment.training.setup import TrainingSetup


class MetricsLogger(Callback):
    """Logs each epoch's metrics at step = epochs done, after the checkpoint is written."""

    def __init__(self, state: TrainingState) -> None:
        self._state = state

    def on_epoch_end(self, end: EpochEnd) -> None:
        metrics = end.metrics | {"epoch": end.epoch, "train_minutes": self._state.elapsed_seconds / 60}
        if self._state.best_mean_dice >= 0:  # -1 until the first validation
            metrics["best_val_mean_dice"] = self._state.best_mean_dice
        mlflow.log_metrics(metrics, step=end.epoch)


class FinalReport(Callback):
    """Learning curves, an overlay of the best model on a validation case, and the best model
    logged and registered; ``version`` is the registered version (None without a best model)."""

    def __init__(self, setup: TrainingSetup, state: TrainingState, val_cases, best_dir: Path) -> None:
        self._setup, self._state, self._val_cases, self._best_dir = setup, state, val_cases, best_dir
        self.version: int | None = None

    def on_fit_end(self, stop_reason: str) -> None:
        state = self._state
        keys = ["train_loss", "val_mean_dice", *(f"val_dice_{name}" for name in state.best_dice)]
        history = store.metric_histories(state.run_id, keys)
        with plots.released(plots.learning_curves(history)) as figure:
            mlflow.log_figure(figure, "learning_curves.png")
        if not self._best_dir.is_dir():
            return
        self._log_overlay()
        config = self._setup.config
        self.version = store.log_model_and_register(
            self._best_dir, config, {"val_mean_dice": state.best_mean_dice}
        )

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
