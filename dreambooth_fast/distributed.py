"""One run over several processes, on torch.distributed as `torchrun` or `accelerate launch` starts it.

The launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_from_env` joins the process
group they describe (gloo on CPUs, NCCL on CUDA devices, each process on the device of its local rank). A run
that was not launched that way is a world of one, `SINGLE`, and calls no collective at all.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TextIO, TypeVar

import torch
import torch.distributed as dist

from .config import DIST_TIMEOUT_S
from .errors import ReportedByRank0, RunStopped, UserError

T = TypeVar("T")


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


def init_from_env(device: torch.device, timeout_s: float = DIST_TIMEOUT_S) -> Dist:
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


def rank0_first(d: Dist, check: Callable[[], T]) -> T:
    """Run `check` on rank 0 first. If it raises a UserError, rank 0 raises it (and prints it) and every other rank
    stops with ReportedByRank0 (printing nothing); else the other ranks run `check` too, each for its own
    result. For the checks before a run writes anything: the user reads each mistake once."""
    if not d.is_distributed:
        return check()
    result, error = None, None
    if d.is_main:
        try:
            result = check()
        except UserError as err:
            error = err
    verdict = [None if error is None else str(error)]
    dist.broadcast_object_list(verdict, src=0)
    if error is not None:
        raise error
    if verdict[0] is not None:
        raise ReportedByRank0(verdict[0])
    return result if d.is_main else check()


def mean_over_ranks(d: Dist, values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `values` over the ranks (for the logged losses: the same on every rank)."""
    if not d.is_distributed:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / d.world_size


def gather(d: Dist, value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank."""
    if not d.is_distributed:
        return [value]
    values = [None] * d.world_size
    dist.all_gather_object(values, value)
    return values


def barrier(d: Dist) -> None:
    if d.is_distributed:
        dist.barrier()


def is_lost_rank(err: BaseException) -> bool:
    """Whether a collective failed because another rank is gone (it died, or its connection did) or timed out."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        word in text for word in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out")
    )


@contextlib.contextmanager
def stop_on_sigterm(d: Dist, hint: Callable[[], str]) -> Iterator[None]:
    """Under a launcher, SIGTERM means the launcher is ending the run (another rank failed, or the user cancelled
    it): turn it into RunStopped, one line ending with `hint()` (how to go on), instead of dying silently."""
    if not d.is_distributed or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise RunStopped("the launcher stopped this rank (SIGTERM: another rank failed, or the run was cancelled); "
                         + hint())

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def lost_rank(err: BaseException, where: str) -> RunStopped:
    """The one line for a collective that failed because another rank is gone, `where` saying how to go on."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    reason = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160]  # gloo's "[file.cc:123] " prefix off
    return RunStopped(f"lost contact with another rank ({reason}): it stopped or was killed; {where}")


# -- FSDP2 ---------------------------------------------------------------------------------------------------------
def shard_unet(unet: torch.nn.Module, param_dtype: torch.dtype | None) -> None:
    """`--fsdp`: shard the UNet's parameters, gradients and optimizer state over the ranks (FSDP2 fully_shard per
    down/mid/up block, then the rest), computing in `param_dtype` (None: fp32) and reducing gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        if block is not None:
            fully_shard(block, mp_policy=policy)
    fully_shard(unet, mp_policy=policy)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value gathered whole; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """A sharded model's (and its optimizer's) whole state, gathered on rank 0 in CPU memory (every rank must call;
    the others get empty dicts). The optimizer's state is keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    return weights, get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, state: dict) -> None:
    """Shard a whole state (as full_state gathers it, read by every rank) back into a sharded model and optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, state, options=options)


def launch_here(nproc: int, args: list[str]) -> int:
    """`--nproc-per-node N`: start N processes of `python -m dreambooth_fast ARGS` on this machine through
    torch.distributed's elastic launcher (what `torchrun --standalone` runs) and return their exit code: 0, or the
    first failed process's (a partial failure of --subjects stays 3; a process killed by a signal gives 1). The
    launcher's own report is left out: each process has printed its one line."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does: N processes would oversubscribe the cores
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "dreambooth_fast", *args)
    except ChildFailedError as err:
        code = err.get_first_failure()[1].exitcode
        return code if code > 0 else 1
    except SignalException:  # Ctrl-C or a kill of this launcher: the processes were stopped and said so
        return 130
    return 0


def shutdown() -> None:
    """Leave the process group (at the end of a run, on every rank)."""
    if dist.is_initialized():
        dist.destroy_process_group()


_quieted_stderr = None  # the real stderr of a rank whose other output goes nowhere (quiet_unless_main)


def launched_rank() -> int:
    """This process's rank as the launcher numbered it (0 when no launcher started it)."""
    return _env_int("RANK", 0) if launched_world_size() > 1 else 0


def quiet_unless_main() -> None:
    """Ranks other than 0 print nothing but their own error line: no progress bars, notes or warnings, which
    rank 0 prints once for the run."""
    global _quieted_stderr
    if launched_rank() == 0 or _quieted_stderr is not None:
        return
    _quieted_stderr = sys.stderr
    sys.stdout = sys.stderr = open(os.devnull, "w")  # open for the life of the process


def reported_once(err: UserError) -> UserError:
    """A mistake every rank finds alike before they join (a bad option): rank 0 prints it, the others stop quietly."""
    return err if launched_rank() == 0 else ReportedByRank0(str(err))


def error_stream() -> TextIO:
    """Where the one error line goes: stderr, also on a rank whose other output is silenced."""
    return _quieted_stderr or sys.stderr


def rank_prefix() -> str:
    """'[rank N] ' in a process a launcher started as one of several, else ''."""
    return f"[rank {launched_rank()}] " if launched_world_size() > 1 else ""
