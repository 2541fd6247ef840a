"""Training checkpoints with torch.distributed.checkpoint, and the final Hugging Face export.

A checkpoint directory ``<run dir>/checkpoints/step_<n>/`` holds the sharded model and optimizer
state (DCP: every rank writes its shards, any world size can load them), plus per-rank extras
(scheduler, RNG states) and ``trainer_state.json`` (step, data position) written by the controller.
It is complete only when ``.complete`` exists, so a run killed while saving never leaves a
half-written checkpoint that looks loadable. The same code serves one process and FSDP2 ranks.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

COMPLETE = ".complete"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> None:
    """Write model + optimizer shards and this rank's ``extra``; every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))
    torch.save(extra, directory / f"extra_rank{_rank()}.pt")
    _barrier()


def mark_complete(directory: str | Path) -> None:
    (Path(directory) / COMPLETE).touch()


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / COMPLETE).exists()


def load_checkpoint(directory: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model + optimizer in place; returns this rank's ``extra``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = Path(directory)
    if not is_complete(directory):
        raise FileNotFoundError(f"{directory} is not a complete kdlib checkpoint (no {COMPLETE})")
    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra_path = directory / f"extra_rank{_rank()}.pt"
    if not extra_path.exists():
        extra_path = directory / "extra_rank0.pt"
    return torch.load(extra_path, weights_only=False)


def full_model_state(module: nn.Module, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The unsharded state dict on the CPU (rank 0 gets it; other ranks an empty dict) of the
    entries under ``prefix``, without it: the student, not what else the objective trains (an
    algorithm's own modules). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoints/step_<n>`` of a run directory."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted(
        (int(p.name.split("_")[1]), p) for p in root.glob("step_*") if p.name.split("_")[1].isdigit() and is_complete(p)
    )
    return steps[-1][1] if steps else None
