"""Several processes under torchrun: the process group, which device each rank uses, values
shared from rank 0, and a task's data fetched once per node before any rank reads it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from segment.config import DataConfig, ExperimentConfig
from segment.data.msd import DataNotFoundError
from segment.data.tasks import TaskSplit, locate_task, split_task
from segment.engine.device import Runtime, make_runtime


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the rank within this node
    # Where the tensors of collectives live: NCCL takes CUDA tensors only, gloo CPU ones.
    collective_device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, value):
        """rank 0's ``value`` (any picklable object) on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share_float(self, value: float) -> float:
        """rank 0's ``value`` on every rank, as one small tensor: cheap enough for every step."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.collective_device)
        dist.broadcast(tensor, src=0)
        return float(tensor.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def start_distributed(runtime_device: str) -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if runtime_device != "cpu" and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    collective_device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        collective_device = f"cuda:{local_rank}"
    return Distributed(dist.get_rank(), world_size, local_rank, collective_device)


def runtime_for(config: ExperimentConfig, device: str, distributed: Distributed) -> Runtime:
    if distributed.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{distributed.local_rank}"
    trainer = config.trainer
    return make_runtime(device, trainer.amp, trainer.channels_last)


def split_on_every_rank(data: DataConfig, data_root: Path, distributed: Distributed) -> TaskSplit:
    """The task's split, on every rank. A missing task is downloaded by local rank 0 of each
    node (nodes need not share a disk) while the other ranks wait at a barrier; a rank whose
    node could not fetch it then fails with the fetch's own sentence."""
    fetch_error: DataNotFoundError | None = None
    if distributed.local_rank == 0:
        try:
            locate_task(data.task, data_root, download=True)
        except DataNotFoundError as error:
            fetch_error = error
    distributed.barrier()
    if fetch_error is not None:
        raise fetch_error
    return split_task(data, data_root, download=False)
