"""Parallelism, activation checkpointing and compilation, applied to the decoder from outside.

The order follows torchtitan: activation checkpointing wraps each block, then each block is compiled, then
the model is sharded with FSDP2 (`fully_shard` per block, then the root) or wrapped in DDP. The model file
knows nothing of any of this.

Weights and optimizer state are saved and loaded as full (unsharded) state dicts through
`torch.distributed.checkpoint.state_dict`, so a checkpoint written under FSDP2 loads under DDP or in one
process, and the reverse.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from tessera.runtime.distributed import DistEnv
from tessera.runtime.inductor import pin_cpu_threads


def apply_activation_checkpointing(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    pin_cpu_threads()  # kernels for this run's thread count, not a cached run's (tessera/runtime/inductor.py)
    for i, block in enumerate(model.layers):
        model.layers[i] = torch.compile(block, fullgraph=False)


def apply_fsdp(model: nn.Module, env: DistEnv, param_dtype: torch.dtype | None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def parallelize(model: nn.Module, env: DistEnv, *, fsdp: bool = False, compile: bool = False,
                activation_checkpointing: bool = False, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Returns the module to train (the DDP wrapper, or the model itself)."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if fsdp:
        if not env.is_distributed:
            raise ValueError("FSDP needs several processes: launch with torchrun --nproc_per_node=N")
        apply_fsdp(model, env, param_dtype)
        return model
    if env.is_distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # The decoder's one buffer, the rotary table, is computed alike on every rank: nothing to broadcast.
        return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                   broadcast_buffers=False)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "layers") else model


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights, on CPU, with clean names (no wrapper prefixes)."""
    sd = get_model_state_dict(unwrap(model), options=_FULL)
    return {clean_name(k): v for k, v in sd.items()}


def clean_name(key: str) -> str:
    """A parameter's name without the activation-checkpointing and compile wrappers' prefixes."""
    return key.replace("._checkpoint_wrapped_module", "").replace("._orig_mod", "")


def load_full_model_state(model: nn.Module, sd: dict[str, torch.Tensor], broadcast_from_rank0: bool = False) -> None:
    """Load unsharded weights with clean names. With `broadcast_from_rank0`, only rank 0's `sd` is read
    (the other ranks pass {}) and each rank receives its part."""
    # torch.distributed.checkpoint names parameters without the wrappers' prefixes, in both directions
    sd = {clean_name(k): v for k, v in sd.items()}
    set_model_state_dict(unwrap(model), sd, options=StateDictOptions(full_state_dict=True, strict=not broadcast_from_rank0,
                                                         broadcast_from_rank0=broadcast_from_rank0))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(unwrap(model), optimizer, options=_FULL)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict) -> None:
    set_optimizer_state_dict(unwrap(model), optimizer, sd, options=StateDictOptions(full_state_dict=True))
