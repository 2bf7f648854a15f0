"""Process group and device from the launcher's environment.

torchrun and the DeepSpeed launcher both export RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; without them moco-scale runs as one plain process
with no process group at all (the reference crashes there).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def world_size_from_env() -> int:
    """The world size the launcher promised, readable before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _choose_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise ValueError(f"--device must be auto, cpu or cuda, not {device!r}")
    return torch.device("cpu")


def init_distributed(device: str = "auto", timeout_s: float = 1800.0, require_group: bool = False) -> DistContext:
    """Join the launcher's process group (NCCL on GPU, gloo on CPU), or run alone: without a
    group, or (`require_group`, for the sharding engines) in a group of one."""
    rank = int(os.environ.get("RANK", "0"))
    world = world_size_from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = _choose_device(device, local_rank)
    if dev.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # The DeepSpeed launcher does not set it; share the cores between local ranks.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun "
                               "or deepspeed, or unset WORLD_SIZE to run as one process")
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
        )
    elif require_group and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world, local_rank, local_world, dev)


def shutdown() -> None:
    """Tear the group down after a barrier, so no rank leaves while another still talks to it."""
    gc.collect()  # free engine-held tensors while gloo can still release them (DeepSpeed exit abort)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all ranks (the global-batch loss from per-rank losses)."""
    value = value.detach().to(torch.promote_types(value.dtype, torch.float32)).clone()
    if get_world_size() > 1:
        dist.all_reduce(value)
        value /= get_world_size()
    return value
