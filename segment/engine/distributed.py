"""Several processes under torchrun: the process group, which device each rank uses, and
values shared from rank 0."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from segment.config import ExperimentConfig
from segment.engine.device import Runtime, make_runtime


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, value):
        """rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def start_distributed(runtime_device: str) -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    backend = "nccl" if runtime_device != "cpu" and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Distributed(dist.get_rank(), world_size)


def runtime_for(config: ExperimentConfig, device: str, distributed: Distributed) -> Runtime:
    if distributed.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return make_runtime(device, config.trainer.amp, config.trainer.channels_last)
