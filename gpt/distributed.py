"""Multi-process training under `torchrun`: process group, DDP wrapping, rank-0-only I/O."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_type: str) -> Dist:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set), else one process."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    info = Dist(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                world_size=int(os.environ["WORLD_SIZE"]))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def teardown(info: Dist) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, info: Dist, device: torch.device) -> torch.nn.Module:
    if not info.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean_across_ranks(value: torch.Tensor, info: Dist) -> float:
    """The mean of a scalar tensor over all ranks, read to the host."""
    if not info.enabled:
        return value.item()
    total = value.detach().double().clone()
    dist.all_reduce(total)
    return total.item() / info.world_size


def any_rank(flag: bool, info: Dist, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank."""
    if not info.enabled:
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def gather_objects(obj: Any, info: Dist) -> list[Any]:
    """Every rank's `obj`, in rank order (one process: [obj])."""
    if not info.enabled:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()
