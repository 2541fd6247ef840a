"""Training checkpoints with torch.distributed.checkpoint, written atomically; the final export.

A checkpoint directory ``<run dir>/checkpoints/step_<n>/`` holds the sharded model and optimizer
state (DCP: every rank writes its shards, any world size can load them), per-rank extras
(scheduler, RNG states), the weights of a self-distillation teacher when it follows the student,
and ``trainer_state.json`` (step, data position) written by the controller.

Writes are atomic: every writer (all student ranks, possibly in several processes, the teacher and
the controller) writes into a hidden staging directory ``.step_<n>.partial-<id>`` next to the final
one; when all of them are done the controller syncs the files to disk and renames the staging
directory to ``step_<n>`` in one ``rename(2)``. A run killed at any moment before that (or a full
disk) leaves the previous checkpoint untouched and a staging directory that nothing loads and the
next save removes. ``.complete`` is still written inside, for checkpoints made by older versions.
Frozen parameters (a LoRA student's base weights, frozen layers) are not saved: a resumed run
rebuilds them from the same config, so a LoRA checkpoint holds only the adapters and their
optimizer state.

Nothing in a checkpoint is executed when it is loaded: what is read, and how it is checked first,
is :mod:`kdlib.parallel.checkpoint_files`.
"""

from __future__ import annotations

import os
import random
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kdlib.errors import CheckpointError, first_line
from kdlib.parallel.checkpoint_files import (
    COMPLETE, check_metadata, is_complete, load_extra_state, plain_data_planner, save_extra_state, verify_checkpoint,
    write_manifest,
)

PARTIAL = ".partial-"


def _trainable_only():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True)


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
    model_state, optim_state = get_state_dict(module, optimizer, options=_trainable_only())
    with storage_errors(directory):
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))
        save_extra_state(directory, _rank(), extra)
    _barrier()


@contextmanager
def storage_errors(directory: str | Path) -> Iterator[None]:
    """Report a failed write as the OS error behind it. torch's zip writer turns a full disk into
    ``RuntimeError: unexpected pos ...`` and DCP wraps every error in a CheckpointException (a
    BaseException); when a write fails, a small synced probe write in ``directory`` recovers the
    real cause (ENOSPC, EDQUOT, EROFS, ...), otherwise the original error stands."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except OSError:
        raise
    except (Exception, CheckpointException) as exc:
        cause = _first_failure(exc) if isinstance(exc, CheckpointException) else exc
        if isinstance(cause, OSError):
            raise cause from None
        raise _probe_write(Path(directory)) or cause from None


def _first_failure(exc: BaseException) -> Exception:
    """The underlying error of a DCP CheckpointException."""
    for failure, _trace in getattr(exc, "failures", {}).values():
        return failure if isinstance(failure, Exception) else RuntimeError(str(failure))
    return RuntimeError(str(exc).strip().splitlines()[0])


def _probe_write(directory: Path) -> OSError | None:
    probe = directory / ".write-probe"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 65536)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        return exc
    finally:
        probe.unlink(missing_ok=True)
    return None


def staging_dir(final: str | Path) -> Path:
    """A fresh hidden directory next to ``final`` that every writer of one checkpoint writes into."""
    final = Path(final)
    return final.parent / f".{final.name}{PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def publish(staging: str | Path, final: str | Path, *, mark_complete: bool = True) -> Path:
    """Make a fully written staging directory ``final``: sync every file, mark it complete (a
    training checkpoint: with the checksums of its files) and rename it in one step (an existing
    ``final`` is replaced only after that)."""
    staging, final = Path(staging), Path(final)
    if mark_complete:
        (staging / COMPLETE).touch()
        write_manifest(staging)
    for path in _files(staging):
        _fsync(path)
    _fsync(staging)
    replaced = None
    if final.exists():  # e.g. a resumed run saving a step again: move the old one aside first
        replaced = final.parent / f".{final.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.rename(final, replaced)
    os.rename(staging, final)
    _fsync(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return final


def partial_dirs(root: str | Path) -> list[Path]:
    """Staging directories left under ``root`` by writes that never finished."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(".") and (PARTIAL in p.name or ".replaced-" in p.name))


def _files(directory: Path) -> Iterator[Path]:
    for root, _dirs, names in os.walk(directory):
        for name in names:
            yield Path(root) / name


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(
    directory: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer, *, verify: bool = True
) -> dict[str, Any]:
    """Restore model + optimizer in place; returns this rank's ``extra``. The checkpoint is
    checked first (:func:`verify_checkpoint`; ``verify=False`` when the caller just did): a
    damaged or modified one is refused in one line."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    directory = Path(directory)
    if verify:
        verify_checkpoint(directory)
    else:
        check_metadata(directory)  # cheap, and what stands between DCP and a crafted pickle
    extra = load_extra_state(directory, _rank())
    model_state, optim_state = get_state_dict(module, optimizer, options=_trainable_only())
    state = {"model": model_state, "optim": optim_state}
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, checkpoint_id=str(directory), planner=plain_data_planner())
    except (Exception, CheckpointException) as exc:  # DCP wraps a rank's failure: keep its first line
        cause = _first_failure(exc) if isinstance(exc, CheckpointException) else exc
        raise CheckpointError(f"cannot load {directory}: {first_line(cause)}") from None
    # not strict: the frozen parameters are not in the checkpoint; everything else must be
    missing, unexpected = set_state_dict(
        module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
        options=StateDictOptions(strict=False),
    )
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise CheckpointError(f"{directory}: checkpoint does not fit the model (missing {sorted(set(missing) - frozen)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
    return extra


# ----------------------------------------------------------------------------------------------
# Checksums: what was published is what is resumed


# ----------------------------------------------------------------------------------------------
# DCP's pickles, read only as plain data


def full_model_state(module: nn.Module, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The unsharded state dict on the CPU (rank 0 gets it; other ranks an empty dict) of the
    entries under ``prefix``, without it: the student, not what else the objective trains (an
    algorithm's own modules). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of the complete ``step_<n>`` directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        (int(p.name.split("_")[1]), p) for p in root.glob("step_*") if p.name.split("_")[1].isdigit() and is_complete(p)
    )


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoints/step_<n>`` of a run directory."""
    steps = complete_checkpoints(Path(run_dir) / "checkpoints")
    return steps[-1][1] if steps else None
