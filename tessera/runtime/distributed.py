"""Process-group setup for torchrun, and the few collectives the trainers need.

One code path serves a plain `python -m ...` run (world size 1, no process group) and
`torchrun --nproc_per_node=N ...` (RANK/WORLD_SIZE/LOCAL_RANK in the environment): gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def parse_device(device: str | None = None) -> torch.device:
    """A device name, checked ('auto' or None: CUDA when available, else CPU); a `TesseraError` in one line
    for a name torch does not know, a device tessera does not run on, or a CUDA device this machine lacks.
    Changes nothing (no current device is set)."""
    from tessera.errors import TesseraError

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TesseraError(f"--device {device} is not a device: give auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise TesseraError(f"--device {device}: tessera runs on cpu or cuda (auto picks cuda when available)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TesseraError(f"--device {device} was asked for, but CUDA is not available on this machine "
                               "(--device cpu, or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TesseraError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_device(device: str | None = None, local_rank: int = 0) -> torch.device:
    """`parse_device`, then for CUDA without an index this process's GPU (`local_rank`), made current."""
    dev = parse_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the torchrun process group if there is one; otherwise a single-process environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce when a process group exists; a no-op otherwise."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        if t.device.type == "cpu" and dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
            buf = t.cuda()
            dist.all_reduce(buf, op=red)
            t.copy_(buf.cpu())
        else:
            dist.all_reduce(t, op=red)
    return t


def broadcast_object(obj, src: int = 0):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def all_gather_object(obj) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
