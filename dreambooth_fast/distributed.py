"""One run over several processes, on torch.distributed as `torchrun` or `accelerate launch` starts it.

The launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_from_env` joins the process
group they describe (gloo on CPUs, NCCL on CUDA devices, each process on the device of its local rank). A run
that was not launched that way is a world of one, `SINGLE`, and calls no collective at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError

DEFAULT_TIMEOUT_S = 600  # how long a rank waits for the others in one collective before it gives up


@dataclass(frozen=True)
class Dist:
    """Who this process is in the run."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # "gloo", "nccl", or "none" for a single process

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run's files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Dist(rank=0, world_size=1, local_rank=0, backend="none")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"the environment variable {name}={value!r} is not a number (set by torchrun)") from None


def launched_world_size() -> int:
    """The number of processes the launcher started (1 when none did)."""
    return _env_int("WORLD_SIZE", 1)


def process_device(device: torch.device) -> torch.device:
    """Each process of a multi-GPU run works on the CUDA device of its local rank."""
    if device.type == "cuda" and device.index is None and launched_world_size() > 1:
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return device


def init_from_env(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Dist:
    """Join the process group the launcher described (idempotent); SINGLE when there is none."""
    world_size = launched_world_size()
    if world_size <= 1:
        return SINGLE
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise UserError(f"WORLD_SIZE={world_size} but {name} is not set: start the run with torchrun or "
                            "accelerate launch, which set both")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Dist(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), backend)


def shutdown() -> None:
    """Leave the process group (at the end of a run, on every rank)."""
    if dist.is_initialized():
        dist.destroy_process_group()
