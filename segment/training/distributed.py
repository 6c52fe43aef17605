"""Several processes under torchrun: the process group, which device each rank uses, values
shared from rank 0, a task's data fetched once per node before any rank reads it, which ranks
were lost when a collective fails, and which run a group that torchrun restarts resumes."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from segment.atomic import write_atomically
from segment.config import DataConfig, ExperimentConfig
from segment.data.msd import DataNotFoundError
from segment.data.tasks import TaskSplit, locate_task, split_task
from segment.engine.device import Runtime, make_runtime

# The ranks wait this long for a node's download of a task, which for some MSD tasks is gigabytes:
# far longer than any collective of training is allowed.
FETCH_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class RankProcess:
    """Where a rank runs: its host and process id."""

    host: str
    pid: int


@dataclass(frozen=True)
class TorchrunJob:
    """The torchrun job a process belongs to: what names it across the restarts of its group
    (``--max-restarts``), and which start of the group this is."""

    name: str
    restart: int  # 0 on the group's first start
    max_restarts: int

    @property
    def restarts_left(self) -> bool:
        return self.restart < self.max_restarts

    def run_record(self, output_root: Path) -> Path:
        """The file in which rank 0 keeps the MLflow run the job trains, so that the group
        torchrun restarts resumes it."""
        digest = hashlib.sha256(self.name.encode()).hexdigest()[:16]
        return output_root / f".torchrun-{digest}.run"

    def record_run(self, output_root: Path, run_id: str) -> None:
        write_atomically(self.run_record(output_root), lambda path: path.write_text(run_id))

    def recorded_run(self, output_root: Path) -> str | None:
        record = self.run_record(output_root)
        return record.read_text() if record.is_file() else None

    def forget_run(self, output_root: Path) -> None:
        self.run_record(output_root).unlink(missing_ok=True)


def torchrun_job() -> TorchrunJob | None:
    """This process's torchrun job, or None outside torchrun."""
    name = os.environ.get("TORCHELASTIC_RUN_ID")
    if name is None:
        return None
    if name == "none":
        # torchrun's default --rdzv-id where it does not make one up (a static rendezvous of
        # several nodes): the same for every job. Rank 0's agent, the parent of its process,
        # is not, and a static rendezvous keeps rank 0 on its node across restarts.
        name = f"{socket.gethostname()}:{os.getppid()}"
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return TorchrunJob(name, restart, int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")))


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the rank within this node
    # Where the tensors of collectives live: NCCL takes CUDA tensors only, gloo CPU ones.
    collective_device: str = "cpu"
    processes: tuple[RankProcess, ...] = ()  # every rank's, by rank
    job: TorchrunJob | None = None
    # The store went with the process hosting it (rank 0, outside torchrun's agent): asking it
    # again would only print the same error.
    _store_gone: bool = field(default=False, repr=False)

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

    def say_stopping(self) -> None:
        """Tell the other ranks that this one stops on purpose (asked to, or because another
        was lost), so that none of them takes it for lost when its connection closes."""
        try:
            dist.distributed_c10d._get_default_store().set(_stopping_key(self.rank), "1")
        except dist.DistError:
            self._store_gone = True

    def ranks_stopping(self) -> set[int]:
        """The other ranks that said they stop on purpose."""
        if self._store_gone:
            return set()
        store = dist.distributed_c10d._get_default_store()
        try:
            return {
                rank
                for rank in range(self.world_size)
                if rank != self.rank and store.check([_stopping_key(rank)])
            }
        except dist.DistError:
            self._store_gone = True
            return set()

    def lost_ranks(self, wait_seconds: float = 0.0) -> list[int]:
        """The ranks whose process has ended without saying it stops on purpose: killed or
        crashed. Only the ranks on this host can be seen. A rank killed outright closes its
        connections as it dies, a crashing one only after printing its traceback, so this
        waits up to ``wait_seconds`` for one while some other rank has not yet said it stops."""
        host = socket.gethostname()
        others = [rank for rank, process in enumerate(self.processes) if rank != self.rank]
        deadline = time.monotonic() + wait_seconds
        while True:
            stopping = self.ranks_stopping()
            lost = [
                rank
                for rank in others
                if rank not in stopping
                and self.processes[rank].host == host
                and _has_ended(self.processes[rank].pid)
            ]
            if lost or len(stopping) == len(others) or time.monotonic() >= deadline:
                return lost
            time.sleep(0.1)


def _stopping_key(rank: int) -> str:
    return f"segment/stopping/{rank}"


def _has_ended(pid: int) -> bool:
    """Whether process ``pid`` of this host has ended."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or its number taken by another user's
        return True
    # A zombie, ended but not yet collected by its parent (torchrun), still takes signals.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:  # collected in between; or no /proc (macOS), where a zombie looks alive
        return Path("/proc/self").is_dir()


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank went away or did not
    answer within the timeout: NCCL and the store raise DistError, gloo a RuntimeError naming
    its own source file."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in str(error))


def start_distributed(runtime_device: str, collective_timeout_seconds: float) -> Distributed:
    """Join torchrun's process group; a collective waits ``collective_timeout_seconds`` for the
    other ranks, so a rank lost stops the others in that time rather than PyTorch's 30 minutes."""
    job = torchrun_job()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(job=job)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if runtime_device != "cpu" and torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=collective_timeout_seconds)
    store = _store_of_this_start(job, world_size, timeout)
    if store is None:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        rank = int(os.environ["RANK"])
        dist.init_process_group(
            backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
    collective_device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        collective_device = f"cuda:{local_rank}"
    processes: list[RankProcess | None] = [None] * world_size
    dist.all_gather_object(processes, RankProcess(socket.gethostname(), os.getpid()))
    return Distributed(dist.get_rank(), world_size, local_rank, collective_device, tuple(processes), job)


def _store_of_this_start(job: TorchrunJob | None, world_size: int, timeout: timedelta) -> dist.Store | None:
    """Where the processes of a group that torchrun may restart meet, apart from the group's
    earlier starts; None: wherever ``init_process_group`` finds (``env://``)."""
    if job is None or not job.max_restarts or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    # torchrun's agent keeps one store for every start of the group, and the addresses an
    # earlier start left there send a restarted group's connections to processes that are gone:
    # its init_process_group times out (pytorch/pytorch#135712). Each start gets keys of its own.
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"segment/start_{job.restart}", agent_store)


def runtime_for(config: ExperimentConfig, device: str, distributed: Distributed) -> Runtime:
    if distributed.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{distributed.local_rank}"
    trainer = config.trainer
    return make_runtime(device, trainer.amp, trainer.channels_last)


def split_on_every_rank(data: DataConfig, data_root: Path, distributed: Distributed) -> TaskSplit:
    """The task's split, on every rank. A missing task is downloaded by local rank 0 of each
    node (nodes need not share a disk) while the other ranks wait at a barrier; a rank whose
    node could not fetch it then fails with the fetch's own sentence."""
    # A group of its own for the wait, whose timeout allows for the download. gloo: an NCCL
    # job spends no GPU memory on it.
    fetch_wait = dist.new_group(backend="gloo", timeout=FETCH_TIMEOUT) if distributed.enabled else None
    fetch_error: DataNotFoundError | None = None
    if distributed.local_rank == 0:
        try:
            locate_task(data.task, data_root, download=True)
        except DataNotFoundError as error:
            fetch_error = error
    if fetch_wait is not None:
        dist.barrier(group=fetch_wait)
        dist.destroy_process_group(fetch_wait)
    if fetch_error is not None:
        raise fetch_error
    return split_task(data, data_root, download=False)
