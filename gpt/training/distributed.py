"""Multi-process training under `torchrun`: process group, DDP or FSDP2 wrapping, rank-0-only I/O.

The launcher is torchrun itself (single node: `--standalone`; multi-node: `--nnodes` and
`--rdzv-endpoint`); this module only reads the environment torchrun sets. A rank that dies is
noticed by torchrun, which stops the others; the process-group timeout (train.dist_timeout)
bounds how long a rank on another node waits in a collective for a peer that is gone.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from gpt.errors import GptError


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


def setup(device_type: str, timeout_s: float = 600.0) -> Dist:
    """Join the process group when started by torchrun (RANK set), even as its only process:
    `torchrun --nproc_per_node=1` with train.parallel=ddp or fsdp then runs the real
    collectives (how scripts/gpu_check.sh tests NCCL on one GPU)."""
    if "RANK" not in os.environ:
        return Dist()
    info = Dist(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                world_size=int(os.environ["WORLD_SIZE"]))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return info


def lost_peer(exc: BaseException) -> bool:
    """Whether a collective failed because another process died or stopped answering: gloo
    says so in a RuntimeError, NCCL raises a DistError."""
    return isinstance(exc, dist.DistError) or any(
        sign in str(exc) for sign in ("Timed out", "Connection closed", "Connection reset", "Broken pipe"))


def teardown(info: Dist) -> None:
    """Destroy the process group. gloo's worker threads drop finished work (the last barrier's)
    after it completes, which takes the interpreter lock; destroying the group joins those
    threads with the lock held, so a thread still dropping work would never be joined (seen
    twice in CI: a finished run that never exited, its main thread in ~ProcessGroupGloo's join,
    a gloo thread waiting for the lock). A pause first lets them take it (a mitigation of
    torch's race, not a cure)."""
    if dist.is_initialized():
        time.sleep(0.1)
        dist.destroy_process_group()


def resolve_parallel(setting: str, info: Dist) -> str:
    """train.parallel as it applies here: auto is ddp under torchrun with several processes,
    else none; without torchrun there is no process group, so every setting trains plainly."""
    if not dist.is_initialized():
        return "none"
    if setting == "none" and info.enabled:
        raise GptError(f"train.parallel=none but torchrun started {info.world_size} processes; "
                       "set train.parallel to auto, ddp or fsdp, or run one process")
    if setting == "auto":
        return "ddp" if info.enabled else "none"
    return setting


def shard(model: torch.nn.Module, blocks: torch.nn.ModuleList, param_dtype: torch.dtype | None) -> None:
    """FSDP2, in place: each Transformer block is its own unit (its weights are gathered just
    before it runs and freed after), then the root holds the rest (embeddings, final norm).
    With a bf16 dtype the gathered weights are bf16 for compute while gradients are reduced in
    fp32; the sharded master weights and the optimizer stay fp32."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Backward passes inside reduce gradients across ranks only when `enabled`: the micro-batches
    before a step's last one accumulate locally and the last reduces their sum once. DDP has
    `no_sync()`; FSDP2 (also behind torch.compile's wrapper, which forwards attributes) has
    `set_requires_gradient_sync`. A module in one process has neither and never reduces."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def local_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's part of each tensor: the local shard of an FSDP DTensor, else the tensor."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An FSDP model's whole state dict, gathered onto rank 0's CPU (other ranks get {}).
    Every rank must call it: it is a collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def mean_across_ranks(value: torch.Tensor | float, info: Dist) -> float:
    """The mean of a scalar over all ranks, read to the host."""
    value = torch.as_tensor(value)
    if not info.enabled:
        return value.item()
    total = value.detach().double().clone()
    if dist.get_backend() == "nccl":
        total = total.cuda()
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
