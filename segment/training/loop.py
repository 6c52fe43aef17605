"""The epoch loop: seed, step through the batches, then hand the epoch to the callbacks while
Ctrl-C and SIGTERM wait. Everything else a run does is a callback."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from segment.training.callbacks import Callback, EpochEnd
from segment.training.checkpoint import TrainingState
from segment.training.distributed import Distributed
from segment.training.schedule import Schedule, TrainingClock
from segment.training.seeding import seed_epoch
from segment.training.setup import TrainingSetup
from segment.training.step import train_step
from segment.training.stop_signals import StopSignals


def fit(
    setup: TrainingSetup,
    loader,
    state: TrainingState,
    callbacks: Sequence[Callback],
    distributed: Distributed | None = None,
) -> str:
    """Train from ``state.epochs_done`` to ``trainer.max_epochs``, or until a callback gives a
    stop reason; return why it stopped. Ctrl-C or SIGTERM raise KeyboardInterrupt, never
    while an epoch's results are being saved."""
    distributed = distributed or Distributed()
    trainer = setup.config.trainer
    clock = TrainingClock(distributed, state.elapsed_seconds)
    schedule = Schedule(trainer, len(loader), clock)
    # With workers the transforms run in them, seeded from this process when they start.
    transforms = loader.dataset if loader.num_workers == 0 else None
    stop_reason = f"{trainer.max_epochs} epochs done"
    with StopSignals() as stop_signals:
        for epoch in range(state.epochs_done, trainer.max_epochs):
            seed_epoch(trainer.seed, distributed.rank, epoch, transforms)
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            for callback in callbacks:
                callback.on_epoch_start(epoch + 1, len(loader))
            setup.network.train()
            epoch_start = time.perf_counter()
            losses, level_norms, samples, skipped = [], [], 0, 0
            for batch in loader:
                result = train_step(setup, batch, schedule.learning_rate(state.global_step))
                state.global_step += 1
                samples += result.samples
                if result.finite:
                    losses.append(result.loss)
                    level_norms.append(result.level_gradient_norms)
                else:
                    skipped += 1
                for callback in callbacks:
                    callback.on_step_end(result)
            epoch_seconds = time.perf_counter() - epoch_start
            elapsed = clock.elapsed()
            reasons = [reason for callback in callbacks if (reason := callback.stop_reason(elapsed))]
            last = bool(reasons) or epoch + 1 == trainer.max_epochs
            metrics = {
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                "skipped_steps": skipped,
                "lr": setup.optimiser.param_groups[0]["lr"],
                "epoch_seconds": epoch_seconds,
                "samples_per_second": samples * distributed.world_size / epoch_seconds,
            }
            if level_norms:
                for level, norm in enumerate(np.mean(level_norms, axis=0), start=1):
                    metrics[f"grad_norm_level_{level}"] = float(norm)
            with stop_signals.saving():
                state.epochs_done, state.elapsed_seconds = epoch + 1, elapsed
                end = EpochEnd(epoch + 1, metrics, last)
                for callback in callbacks:
                    callback.on_epoch_end(end)
            if reasons:
                stop_reason = reasons[0]
                break
    for callback in callbacks:
        callback.on_fit_end(stop_reason)
    return stop_reason
