"""What happens around the epochs, one job per callback: the progress bar, the time budget,
validation, the best model, the checkpoint. MLflow's callbacks are in ``tracking_callbacks``,
so a run without MLflow (the GPU benchmark) imports none of it.

At the end of an epoch the loop calls every callback's ``on_epoch_end`` in list order, while
Ctrl-C and SIGTERM wait: validation first (it adds its metrics and says whether the model
improved), then those that save, then those that log what was saved."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from segment.engine.scoring import mean_dice, validation_dice
from segment.errors import DiskFullError
from segment.models import save_model
from segment.models.serialization import is_model_directory
from segment.training.checkpoint import CHECKPOINT_FILE, TrainingState, save_checkpoint
from segment.training.setup import TrainingSetup
from segment.training.step import StepResult

BEST_MODEL_DIR = "best"


@dataclass
class EpochEnd:
    epoch: int  # epochs done, counting from 1
    metrics: dict[str, float]
    last: bool  # the run stops after this epoch
    improved: bool = False  # validated, and better than every earlier validation
    scores: dict[str, float] = field(default_factory=dict)  # validation Dice per label


class Callback:
    """Override the hooks a feature needs; the others do nothing."""

    def on_epoch_start(self, epoch: int, steps: int) -> None:
        """Epoch ``epoch`` (from 1) of ``steps`` steps begins."""

    def on_step_end(self, result: StepResult) -> None:
        pass

    def stop_reason(self, elapsed_seconds: float) -> str | None:
        """Why the run should stop after this epoch, or None to go on."""
        return None

    def on_epoch_end(self, end: EpochEnd) -> None:
        pass

    def on_fit_end(self, stop_reason: str) -> None:
        """The run completed (it was not interrupted)."""


class ProgressBar(Callback):
    def __init__(self, max_epochs: int) -> None:
        self._max_epochs = max_epochs
        self._bar: tqdm | None = None
        self._val_dice = float("nan")

    def on_epoch_start(self, epoch: int, steps: int) -> None:
        self._bar = tqdm(total=steps, desc=f"epoch {epoch}/{self._max_epochs}", leave=False)

    def on_step_end(self, result: StepResult) -> None:
        self._bar.update()
        self._bar.set_postfix(loss=f"{result.loss:.3f}", val_dice=f"{self._val_dice:.3f}", refresh=False)

    def on_epoch_end(self, end: EpochEnd) -> None:
        self._val_dice = end.metrics.get("val_mean_dice", self._val_dice)
        self._bar.close()


class TimeBudget(Callback):
    def __init__(self, minutes: float) -> None:
        self._minutes = minutes

    def stop_reason(self, elapsed_seconds: float) -> str | None:
        if elapsed_seconds >= 60.0 * self._minutes:
            return f"time budget of {self._minutes} min reached"
        return None


class Validation(Callback):
    """Mean Dice on the validation cases every ``val_every`` epochs and after the last; every
    rank scores its share and MONAI's average gathers them."""

    def __init__(
        self, setup: TrainingSetup, cases, label_names: dict[int, str], state: TrainingState
    ) -> None:
        self._setup, self._cases, self._label_names, self._state = setup, cases, label_names, state

    def on_epoch_end(self, end: EpochEnd) -> None:
        config = self._setup.config
        if end.epoch % config.trainer.val_every and not end.last:
            return
        scores = validation_dice(
            self._setup.kept_model, self._cases, self._setup.runtime, config, self._label_names
        )
        mean = mean_dice(scores)
        end.scores = scores
        end.metrics |= {f"val_dice_{name}": value for name, value in scores.items()}
        end.metrics["val_mean_dice"] = mean
        state = self._state
        if mean > state.best_mean_dice:
            state.best_mean_dice, state.best_epoch, state.best_dice = mean, end.epoch, scores
            end.improved = True


class BestModel(Callback):
    """Saves the validated weights as a model folder whenever they improve: each file replaced
    whole, so that a full disk leaves a complete model there, never half a file."""

    def __init__(self, setup: TrainingSetup, folder: Path) -> None:
        self._setup, self.folder = setup, folder

    def on_epoch_end(self, end: EpochEnd) -> None:
        if end.improved:
            with _stops_when_full("the best model", end.epoch, self.folder, self.folder.parent):
                save_model(self._setup.kept_model, self._setup.config, self.folder)


class Checkpoint(Callback):
    """Writes the checkpoint a run resumes from, every epoch, before anything is logged: a run
    killed outright (SIGKILL, power cut) in between resumes after this epoch, so no epoch is
    ever logged twice."""

    def __init__(self, setup: TrainingSetup, state: TrainingState, run_dir: Path) -> None:
        self._setup, self._state, self._run_dir = setup, state, run_dir

    def on_epoch_end(self, end: EpochEnd) -> None:
        setup = self._setup
        with _stops_when_full("the checkpoint", end.epoch, self._run_dir / CHECKPOINT_FILE, self._run_dir):
            save_checkpoint(
                self._run_dir, self._state, setup.model, setup.optimiser, setup.scaler, setup.averaged
            )


@contextmanager
def _stops_when_full(what: str, epoch: int, target: Path, run_dir: Path) -> Iterator[None]:
    """A full disk while ``what`` of ``epoch`` is saved to ``target`` in ``run_dir`` (a folder
    named by the run id) stops the run in one sentence: what is kept, and how to go on once
    there is room. The checkpoint there is the previous epoch's: it is rewritten every epoch."""
    try:
        yield
    except DiskFullError as error:
        if (run_dir / CHECKPOINT_FILE).is_file():
            best = "the best model and " if is_model_directory(run_dir / BEST_MODEL_DIR) else ""
            then = (
                f"training stopped with {best}the checkpoint of epoch {epoch - 1} intact: free some space, "
                f"then continue with: segment train --resume {run_dir.name} --output-dir {run_dir.parent}"
            )
        else:
            then = "training stopped before its first checkpoint: free some space, then start it again"
        raise DiskFullError(
            f"Out of disk space: could not write {what} of epoch {epoch} to {target} ({error.reason}); {then}.",
            error.reason,
        ) from None
