"""A torchrun entry point for tests/test_distributed.py: gradient accumulation under FSDP2.

Every rank builds the same tiny GPT twice, shards one copy and runs `accumulate_gradients` over
its rows of three micro-batches; the other copy runs one process's accumulation over the whole
job's rows. The sharded gradients must equal the whole ones, and no gradient may be reduced
before the last micro-batch (a forward pre-hook sees whether the sharded parameters already
hold gradients)."""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist

from gpt.config import build_config
from gpt.model import GPT
from gpt.training import distributed
from gpt.training.loop import accumulate_gradients

info = distributed.setup("cpu")
torch.manual_seed(0)
config = build_config({"model": {"preset": "tiny", "block_size": 16, "vocab_size": 50}}).model
whole = GPT(config)
sharded = copy.deepcopy(whole)
distributed.shard(sharded, sharded.blocks, None)
generator = torch.Generator().manual_seed(1)
rows, micro_batches = 2, 3
batches = [torch.randint(0, 50, (rows * info.world_size, 17), generator=generator) for _ in range(micro_batches)]
mine = [(b[info.rank * rows:(info.rank + 1) * rows, :-1], b[info.rank * rows:(info.rank + 1) * rows, 1:])
        for b in batches]

reduced_before = []
sharded.register_forward_pre_hook(prepend=True, hook=lambda module, args: reduced_before.append(
    any(p.grad is not None for p in module.parameters())))  # before FSDP unshards them
accumulate_gradients(sharded, mine, contextlib.nullcontext)
accumulate_gradients(whole, [(b[:, :-1], b[:, 1:]) for b in batches], contextlib.nullcontext)

assert reduced_before == [False] * micro_batches, f"gradients reduced before the last micro-batch: {reduced_before}"
for (name, p), (_, q) in zip(sharded.named_parameters(), whole.named_parameters()):
    torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-4, atol=1e-6, msg=name)
dist.barrier()
if info.is_main:
    print("fsdp accumulation ok")
distributed.teardown(info)
