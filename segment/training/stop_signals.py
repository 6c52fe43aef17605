"""Stopping a training run cleanly on Ctrl-C or SIGTERM, never in the middle of saving."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Ctrl-C, and a scheduler's SIGTERM, stop training by raising KeyboardInterrupt, except
    while an epoch's results are being saved: a stop that arrives then waits for the
    checkpoint and the MLflow metrics to be written together, so a resumed run neither
    repeats nor loses an epoch's record."""

    def __init__(self) -> None:
        self._saving = False
        self._pending = False
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self._saving:
            self._pending = True
        else:
            raise KeyboardInterrupt

    def __enter__(self) -> StopSignals:
        self._previous = {number: signal.signal(number, self._handler) for number in _STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)

    @contextmanager
    def saving(self) -> Iterator[None]:
        self._saving = True
        try:
            yield
        finally:
            self._saving = False
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt


def ignore_stop_signals() -> None:
    """Ignore Ctrl-C and SIGTERM from now on, in a process of a torchrun job that is already
    stopping: torchrun's SIGTERM to the survivors of a lost rank must not cut short their
    cleanup and the sentence that says what happened (torchrun kills them after 30 s anyway)."""
    for number in _STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
