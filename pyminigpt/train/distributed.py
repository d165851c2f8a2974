"""The Trainer's other processes: torchrun's process group (distributed data parallel), DataLoader workers."""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist


def join_process_group(on_cuda: bool) -> tuple[int, int, int]:
    """(rank, world_size, local_rank), joining the torchrun process group when WORLD_SIZE > 1:
    NCCL for a CUDA run, gloo for a CPU run (even on a machine that has a GPU)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return rank, world, int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if on_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which finishes its step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
