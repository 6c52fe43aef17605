"""The learning-rate schedule and the clock it runs on: by steps, or by time when a time
budget binds first, with rank 0's time on every rank so that replicas keep one schedule."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from segment.config import TrainerConfig
from segment.training.distributed import Distributed


def learning_rate(trainer: TrainerConfig, progress: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine or poly decay over ``progress`` in [0, 1]."""
    peak = trainer.lr
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    if trainer.schedule == "poly":
        return peak * (1.0 - progress) ** 0.9
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainingClock:
    """Seconds of training so far, counting those of earlier sessions of a resumed run. Under
    torchrun every rank reads rank 0's clock: each call is a collective, so all ranks call it
    at the same points."""

    def __init__(
        self,
        distributed: Distributed,
        elapsed_before: float = 0.0,
        now: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._distributed, self._now = distributed, now
        self._start = now() - elapsed_before

    def elapsed(self) -> float:
        return self._distributed.share_float(self._now() - self._start)


class Schedule:
    """The learning rate of each step of a run."""

    def __init__(self, trainer: TrainerConfig, steps_per_epoch: int, clock: TrainingClock) -> None:
        self._trainer, self._clock = trainer, clock
        self._total_steps = max(1, trainer.max_epochs * steps_per_epoch)
        self._warmup_steps = trainer.warmup_epochs * steps_per_epoch
        minutes = trainer.max_minutes
        self._budget_seconds = None if minutes is None else 60.0 * minutes

    def progress(self, step: int) -> float:
        """Fraction of the schedule done: by steps, or by time when a time budget binds first."""
        fraction = step / self._total_steps
        if self._budget_seconds is not None:
            fraction = max(fraction, self._clock.elapsed() / self._budget_seconds)
        return fraction

    def learning_rate(self, step: int) -> float:
        return learning_rate(self._trainer, self.progress(step), step, self._warmup_steps)
