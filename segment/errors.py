"""The errors a user can cause and fix: each message is one sentence saying what is wrong and
what to do. The CLI turns any of them into that sentence and exit code 2; anything else is a
bug and keeps its traceback."""

from __future__ import annotations


class SegmentError(Exception):
    """Base of every error the user can act on: a bad file, config, model, store, device or
    argument."""


class InputError(SegmentError):
    """An argument cannot be used: a missing input, an output that exists or cannot be written,
    a skip mask of the wrong length, an option out of range."""


class DiskFullError(SegmentError, OSError):
    """A file could not be written for lack of room: a full disk, a quota, a file-size limit.
    Whatever it was to replace is intact. Also an ``OSError``, the failure it reports, so that
    code that tolerates a failed write (a cache) goes on tolerating it."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # the system's words: "No space left on device"
