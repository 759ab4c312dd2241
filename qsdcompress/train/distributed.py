"""Distributed runs: under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK set) finetuning runs DDP, gloo on
CPU and nccl on CUDA, each rank a disjoint shard of every epoch; only rank 0 writes and prints."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from ..loading import pick_device


class DistInfo:
    """Rank, world size and device of this process (world 1 without torchrun)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, device: torch.device | None = None,
                 owns_group: bool = False):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = device or torch.device("cpu")
        self.owns_group = owns_group

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when its environment is set (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world <= 1:
        return DistInfo(0, 1, 0, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)


def sync_running_stats(module: nn.Module) -> None:
    """Average the BatchNorm and IE-LIF running statistics over the ranks (timm's ``distribute_bn``):
    DDP keeps parameters in sync, but each rank updates its running statistics from its own shard."""
    from timm.utils import distribute_bn

    distribute_bn(module, dist.get_world_size(), reduce=True)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


__all__ = ["DistInfo", "init_distributed", "sync_running_stats", "unwrap"]
