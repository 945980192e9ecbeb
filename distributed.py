"""
Data parallelism for train.py and dpo.py: the process group, DDP or FSDP2, and the few collectives the loop uses.

    torchrun --nproc_per_node=8 train.py ... --device cuda          # DDP: a whole model per GPU
    torchrun --nproc_per_node=8 train.py ... --device cuda --fsdp   # FSDP2: parameters, gradients, optimiser sharded

- One process per GPU on NCCL, or per CPU slot on gloo (the tests run two CPU processes). NCCL takes CUDA
  tensors only: every tensor a collective sees lives on the run's device.
- FSDP2 (`fully_shard`) wraps each LLM block, then the model; on CUDA the fp32 shards are gathered in bf16
  and the gradients reduced in fp32.
- Every trainable parameter gets a gradient in every step, text-only micro-batches included: model.py keeps
  the vision path in the graph with a zero weight, so no rank skips a collective the others wait in.
- Gradient accumulation reduces only after the last micro-batch of a step (DDP's no_sync, FSDP2's
  set_requires_gradient_sync).
- Rank 0 alone writes checkpoints while the others wait at a barrier: the timeout (--dist-timeout) is an hour,
  not NCCL's default ten minutes.
"""
import datetime
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist


def setup(device, timeout_minutes=60.0):
    """(rank, world, device) of this process. Under torchrun: cuda:LOCAL_RANK on NCCL, or the CPU on gloo."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not str(device).startswith("cuda"):
        dist.init_process_group("gloo", timeout=timeout)
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    # the GPU first, then NCCL bound to it: no rank creates a context on GPU 0, and communicators start eagerly
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", timeout=timeout, device_id=device)
    return dist.get_rank(), dist.get_world_size(), device


def close():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def print0(*a, **kw):
    if rank() == 0:
        print(*a, **kw, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(x):
    """Sum a tensor over ranks, in place. It must live on the run's device: NCCL takes CUDA tensors only."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def wrap(m, device, world, fsdp=False):
    """DDP (default) or FSDP2 across ranks; returns the module to call (the unwrapped model stays `m`). Under
    torchrun even one process is wrapped (a one-rank mesh): what runs on one GPU is what runs on eight."""
    if not dist.is_initialized():
        return m
    if fsdp:
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:  # torch < 2.6 keeps FSDP2 under its first, private name
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
        # On CUDA the fp32 shards are gathered in bf16 (what autocast computes in; half the traffic) and the
        # gradients reduced in fp32. On the CPU nothing runs in bf16, so the gathers stay in the weights' dtype.
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda"
              else MixedPrecisionPolicy())
        for block in m.lang_model.model.layers:
            fully_shard(block, mp_policy=mp)
        return fully_shard(m, mp_policy=mp)
    from torch.nn.parallel import DistributedDataParallel
    # every trainable parameter gets a gradient in every step (see above): DDP need not search for unused ones
    return DistributedDataParallel(m, device_ids=[device.index] if device.type == "cuda" else None)


def sharded(module):
    """True when FSDP2 has sharded the module's parameters (they are DTensors)."""
    return any(hasattr(p, "device_mesh") for p in module.parameters())


def sync_grads(wrapped, last):
    """Reduce gradients across ranks after the last micro-batch of a step only: DDP's no_sync before it; FSDP2
    keeps the earlier micro-batches' gradients unsharded instead of reduce-scattering each (more memory:
    one unsharded copy of the trainable gradients; less traffic)."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(last)
        return nullcontext()
    return nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
