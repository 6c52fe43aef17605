"""Training checkpoints: written atomically every epoch (a full disk leaves the previous one),
read back without unpickling code. They hold no random-generator state: every rank reseeds
each epoch (``seeding``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from segment.atomic import write_atomically
from segment.errors import SegmentError

CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(SegmentError):
    """A checkpoint is missing or unreadable."""


@dataclass
class TrainingState:
    """Everything beyond the weights that a resumed run needs to carry on where it stopped."""

    run_id: str
    config_yaml: str
    epochs_done: int = 0
    global_step: int = 0
    elapsed_seconds: float = 0.0
    best_mean_dice: float = -1.0
    best_epoch: int = 0
    best_dice: dict[str, float] = field(default_factory=dict)


def save_checkpoint(
    directory: Path,
    state: TrainingState,
    model: torch.nn.Module,
    optimiser,
    scaler,
    averaged: torch.nn.Module | None = None,
) -> Path:
    """Write ``checkpoint.pt`` via a temporary file and a rename: never half-written."""
    payload = {
        "state": asdict(state),
        "model": model.state_dict(),
        "averaged": averaged.state_dict() if averaged is not None else {},
        "optimiser": optimiser.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
    }
    path = directory / CHECKPOINT_FILE
    write_atomically(path, lambda temporary: _save(payload, temporary))
    return path


def _save(payload: dict, path: Path) -> None:
    """``torch.save`` through a file that keeps its failed write: torch's C++ writer turns it
    into a bare RuntimeError ("unexpected pos"), and only the OSError says the disk is full."""
    with open(path, "wb") as file:
        keeping = _KeepsWriteError(file)
        try:
            torch.save(payload, keeping)
        except RuntimeError:
            if keeping.error is None:
                raise
            raise keeping.error from None


class _KeepsWriteError:
    def __init__(self, file) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self._file.flush()


def load_checkpoint(directory: Path) -> dict:
    """Read a checkpoint with ``weights_only=True``: tensors and plain data, no code."""
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(
            f"No checkpoint at {path}; a run can only resume from the folder it trained in."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        payload["state"] = TrainingState(**payload["state"])
    except Exception as error:  # any failure to parse means the file cannot be used
        raise CheckpointError(
            f"The checkpoint {path} is unreadable ({error.__class__.__name__}); it may be corrupt."
        ) from None
    return payload
