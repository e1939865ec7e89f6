"""torchrun support: process-group set-up, DDP / FSDP wrapping, small collectives.

Launch with ``torchrun --nproc_per_node=N -m kind_fast pretrain ...`` (multi-node: add
``--nnodes``, ``--node_rank`` and a rendezvous endpoint as usual). Without torchrun's
environment (``WORLD_SIZE`` unset or 1) everything runs in one process and nothing here
touches torch.distributed. The backend is NCCL on GPUs and gloo on CPUs.

DDP and KIND: every tailor gets a gradient every step. The kind_linear backward returns
full-size dU_T, dσ_T, dV_T, with exact zeros for tailors that no class in the local batch
switched on, so DDP's reducer sees every trainable parameter "used" and runs with
``find_unused_parameters=False`` (the fast default); the zero rows are averaged like any other
gradient. (A rank whose batch holds no sample of class c contributes zeros for c's tailors,
which is exactly its share of the global-batch gradient.)

FSDP (``distributed: fsdp``): FSDP2 ``fully_shard`` per DiT block and on the root, for models
whose parameters and optimiser state do not fit one device (DiT-XL and up). Frozen learngenes
are sharded too; checkpoints are gathered to full tensors on save (torch.distributed.checkpoint
state-dict helpers), so a checkpoint loads at any world size and in either mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    """'auto' → cuda:LOCAL_RANK when a GPU is visible, else cpu; 'cuda' → cuda:LOCAL_RANK."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {pref!r} was asked for but torch sees no CUDA GPU "
                             f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
        return torch.device(pref if ":" in pref else f"cuda:{local_rank}")
    if pref != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {pref!r}")
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto") -> DistEnv:
    """Join torchrun's process group when its environment says WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=resolve_device(device_pref))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        created = True
    if dist.get_world_size() != world:
        raise RuntimeError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, initialized_here=created)


def cleanup(env: DistEnv) -> None:
    if env.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv, strategy: str = "ddp") -> nn.Module:
    """DDP (default) or FSDP2 around ``model`` (already on ``env.device``); identity in one process."""
    if not env.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                   broadcast_buffers=False, find_unused_parameters=False)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"distributed strategy must be ddp or fsdp, got {strategy!r}")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if not env.distributed:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / env.world_size


def all_gather_object(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(obj, env: DistEnv):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
