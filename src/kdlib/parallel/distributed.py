"""torch.distributed process groups for data-parallel student workers.

A launcher that starts several student workers (``launcher=ray``) tells each its rank and world
size and sets ``MASTER_ADDR``/``MASTER_PORT``; the worker calls :func:`init_process_group` here.
The backend is NCCL on GPUs and gloo on CPUs, so the same run works on a laptop and a cluster.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """An unused TCP port on this host (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def node_address() -> str:
    """This host's address as other hosts of a cluster reach it."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return socket.gethostbyname(socket.gethostname())


def init_process_group(rank: int, world_size: int, device: torch.device, *, timeout_s: float = 600.0) -> None:
    """Join the student group (MASTER_ADDR/MASTER_PORT from the environment); idempotent."""
    if dist.is_initialized():
        return
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"{key} is not set: the launcher must set it for rank {rank}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
