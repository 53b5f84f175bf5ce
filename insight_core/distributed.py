"""Minimal ``torch.distributed`` helpers for running precompute stages under ``torchrun``.

``torchrun --nproc_per_node N -m precompute <stage> ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment. :func:`init_from_env` joins them into one
process group (NCCL for CUDA devices, each process on ``cuda:LOCAL_RANK``; gloo on CPU). Every
other helper is a no-op when no process group is initialised, so single-process runs take exactly
the code path they always took.

The collective helpers accept tensors on any device: with the NCCL backend a CPU tensor is
reduced through a temporary copy on the process's GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import logging
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from insight_core.device import wants_cuda
from insight_core.errors import ConfigError

log = logging.getLogger(__name__)

_OPS = {
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT,
}


@dataclasses.dataclass(frozen=True, slots=True)
class DistInfo:
    """Position of this process in a (possibly single-process) run."""

    rank: int = 0
    """Global rank (0 .. world_size - 1)."""
    world_size: int = 1
    """Number of processes."""
    local_rank: int = 0
    """Rank on this machine; selects ``cuda:LOCAL_RANK``."""

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from err


def env_info() -> DistInfo:
    """``DistInfo`` from the ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` environment (torchrun's)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(
            f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}"
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def is_initialized() -> bool:
    """True when a process group is active (we run under torchrun with WORLD_SIZE > 1)."""
    return dist.is_available() and dist.is_initialized()


def current() -> DistInfo:
    """This process's ``DistInfo``: from the active process group, else single-process."""
    if not is_initialized():
        return DistInfo()
    return DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=_env_int("LOCAL_RANK", 0)
    )


def local_device_name(device: str, info: DistInfo) -> str:
    """The device a process should use: ``cuda:LOCAL_RANK`` for CUDA devices in distributed runs.

    Single-process runs get ``device`` back unchanged ('auto' stays 'auto').
    """
    if not info.is_distributed or not wants_cuda(device):
        return device
    if str(device) not in ("auto", "cuda", f"cuda:{info.local_rank}"):
        log.warning("device %s replaced by cuda:%d (LOCAL_RANK) under torchrun", device, info.local_rank)
    return f"cuda:{info.local_rank}"


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """``torch.device`` version of :func:`local_device_name` for an already resolved device."""
    if info.is_distributed and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def init_from_env(device: str | torch.device = "auto", timeout: datetime.timedelta | None = None) -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; a no-op for single-process runs.

    Parameters
    ----------
    device
        The job's device ('auto', 'cpu', 'cuda', 'cuda:N'): CUDA devices use NCCL with each
        process on ``cuda:LOCAL_RANK``, CPU uses gloo.
    timeout
        How long a collective (or barrier) may wait for the other ranks; None = torch's default.

    Returns
    -------
    DistInfo
        Rank, world size and local rank (``DistInfo()`` when not distributed). Safe to call twice:
        an already initialised group is reused.
    """
    info = env_info()
    if not info.is_distributed:
        return info
    if is_initialized():
        return current()
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={info.world_size} but this torch build has no torch.distributed")
    # torch._dynamo (imported lazily, e.g. by the first optimizer step) holds on to a process group
    # that exists when it is imported, so destroy_process_group() cannot free it; gloo's worker
    # threads then outlive the interpreter and can abort the process at exit ("terminate called
    # without an active exception"). Importing it before the group exists avoids that.
    importlib.import_module("torch._dynamo")
    if wants_cuda(device):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available")
        torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", info.local_rank), timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    log.info(
        "joined process group: rank %d of %d (local rank %d, backend %s)",
        info.rank,
        info.world_size,
        info.local_rank,
        dist.get_backend(),
    )
    return current()


def is_main() -> bool:
    """True on rank 0, and always in single-process runs."""
    return current().is_main


def barrier() -> None:
    """Wait for every process; no-op when not distributed."""
    if not is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _comm_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor the backend can communicate: NCCL needs CUDA tensors, gloo CPU (or CUDA) ones."""
    if dist.get_backend() == "nccl" and not tensor.is_cuda:
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def all_reduce_(tensor: torch.Tensor, op: str | dist.ReduceOp = "sum") -> torch.Tensor:
    """In-place all-reduce (``op``: 'sum', 'max', 'min', 'product' or a ``ReduceOp``); returns ``tensor``.

    No-op when not distributed. Every rank receives the same result.
    """
    if not is_initialized():
        return tensor
    reduce_op = _OPS[op] if isinstance(op, str) else op
    buf = _comm_tensor(tensor)
    dist.all_reduce(buf, op=reduce_op)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast of rank ``src``'s ``tensor`` to all ranks; returns it. No-op if not distributed."""
    if not is_initialized():
        return tensor
    buf = _comm_tensor(tensor)
    dist.broadcast(buf, src=src)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def broadcast_flag(flag: bool, src: int = 0) -> bool:
    """Rank ``src``'s boolean decision, on every rank (``flag`` itself when not distributed)."""
    if not is_initialized():
        return flag
    return bool(broadcast_(torch.tensor([int(flag)], dtype=torch.int32), src=src).item())


def cleanup() -> None:
    """Wait for every rank, then destroy the process group; no-op when none is active.

    The barrier keeps a rank from tearing its group down while a peer still talks to it.
    """
    if is_initialized():
        barrier()
        dist.destroy_process_group()


def quiet_non_main_logging(info: DistInfo, names: tuple[str, ...] = ("insight_core", "precompute")) -> None:
    """On ranks other than 0, show only warnings of our loggers (rank 0 reports progress)."""
    if info.is_distributed and not info.is_main:
        for name in names:
            logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def job_group(
    device: str | torch.device = "auto", timeout: datetime.timedelta | None = None
) -> Iterator[DistInfo]:
    """A stage's process group: join it (:func:`init_from_env`), quiet non-main ranks, and leave it
    at the end if this call created it (a caller's group, e.g. ``build``'s, stays up).

    On an error the group is left as is: the barrier of :func:`cleanup` could wait forever on a
    rank that died, and torchrun tears the processes down anyway.
    """
    owns_group = not is_initialized()
    info = init_from_env(device, timeout)
    quiet_non_main_logging(info)
    yield info
    if owns_group:
        cleanup()
