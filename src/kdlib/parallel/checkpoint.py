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

Nothing in a checkpoint is executed when it is loaded. kdlib's own per-rank state (scheduler, RNG
states of python / numpy / torch / CUDA, the step) is ``extra_rank<r>.json`` with its tensors in
``extra_rank<r>.safetensors``, read without pickle; a checkpoint of an older version, whose state
is a pickle (``extra_rank<r>.pt``), is refused (``python -m kdlib.parallel.checkpoint convert
DIR`` rewrites one you trust). DCP's own files hold pickles too: ``.metadata`` is first read by a
restricted unpickler that admits only checkpoint-metadata types, and the non-tensor values of the
shards (optimizer settings) are read by torch's ``weights_only`` loader before DCP reads them.
``checksums.sha256`` (``sha256sum -c`` format) lists every file; a resume refuses a checkpoint
whose files differ from it (docs/reliability.md, "What is trusted").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kdlib.errors import CheckpointError, first_line

COMPLETE = ".complete"
PARTIAL = ".partial-"
MANIFEST = "checksums.sha256"
METADATA = ".metadata"  # DCP's index of the shards (a pickle)
EXTRA_FORMAT = "kdlib-checkpoint-extra/1"
_TAG = "__kdlib__"  # marks the JSON objects that stand for a tuple, a tensor, an array, ...


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


def save_extra_state(directory: str | Path, rank: int, state: dict[str, Any]) -> None:
    """``extra_rank<rank>.json`` (the structure and plain values of ``state``) and
    ``extra_rank<rank>.safetensors`` (its tensors and arrays): plain data, no pickle."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps({"format": EXTRA_FORMAT, "state": _encode(state, tensors, "state")})
    from safetensors.torch import save_file

    save_file(tensors, str(directory / f"extra_rank{rank}.safetensors"))
    (directory / f"extra_rank{rank}.json").write_text(text, encoding="utf-8")


def load_extra_state(directory: str | Path, rank: int) -> dict[str, Any]:
    """What :func:`save_extra_state` wrote for ``rank`` (rank 0's when the checkpoint was written
    by fewer ranks); an older checkpoint's pickled state is refused in one line."""
    directory = Path(directory)
    names = [f"extra_rank{rank}", "extra_rank0"]
    found = next((n for n in names if (directory / f"{n}.json").is_file()), None)
    if found is None:
        pickled = next((directory / f"{n}.pt" for n in names if (directory / f"{n}.pt").is_file()), None)
        if pickled is not None:
            raise CheckpointError(
                f"{directory} was written by an older kdlib: its state {pickled.name} is a pickle, which can run "
                f"code when loaded, so it is not read; if you trust it, convert it once with "
                f"`python -m kdlib.parallel.checkpoint convert {directory}`"
            )
        raise CheckpointError(f"{directory}: extra_rank0.json is missing; it is not a complete kdlib checkpoint")
    json_path, tensor_path = directory / f"{found}.json", directory / f"{found}.safetensors"
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
        if not isinstance(document, dict) or document.get("format") != EXTRA_FORMAT:
            raise ValueError(f"format {document.get('format') if isinstance(document, dict) else None!r} is not "
                             f"{EXTRA_FORMAT!r}")
        from safetensors.torch import load_file

        return _decode(document["state"], load_file(str(tensor_path)) if tensor_path.exists() else {})
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"cannot read {json_path}: {first_line(exc)}") from None
    except Exception as exc:  # safetensors' own error for a damaged file
        raise CheckpointError(f"cannot read {tensor_path}: {first_line(exc)}") from None


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """``value`` as JSON, its tensors and numpy arrays moved to ``tensors`` (named t0, t1, ...)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {_TAG: "tuple", "items": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and _TAG not in value:
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {_TAG: "dict", "items": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                                        for k, v in value.items()]}
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu").contiguous().clone()
        return {_TAG: "tensor", "name": name}
    if isinstance(value, np.ndarray) and value.dtype.kind in _ARRAY_KINDS:
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(np.frombuffer(np.ascontiguousarray(value).tobytes(), dtype=np.uint8).copy())
        return {_TAG: "ndarray", "name": name, "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.generic) and value.dtype.kind in _ARRAY_KINDS:
        return {_TAG: "numpy", "dtype": value.dtype.str, "value": value.item()}
    raise TypeError(f"cannot store {where} (a {type(value).__name__}) in a checkpoint: not plain data")


_ARRAY_KINDS = "biufc"  # numpy dtypes of plain numbers (never objects)


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_encode`; builds only containers, numbers, strings, tensors and arrays."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag is None:
        return {k: _decode(v, tensors) for k, v in value.items()}
    if tag == "tuple":
        return tuple(_decode(v, tensors) for v in value["items"])
    if tag == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["items"]}
    if tag == "tensor":
        return tensors[value["name"]]
    dtype = np.dtype(str(value["dtype"]))
    if dtype.kind not in _ARRAY_KINDS:
        raise ValueError(f"array of dtype {dtype} is not plain data")
    if tag == "ndarray":
        return np.frombuffer(tensors[value["name"]].numpy().tobytes(), dtype=dtype).reshape(value["shape"]).copy()
    if tag == "numpy":
        return dtype.type(value["value"])
    raise ValueError(f"unknown entry {str(tag)[:40]!r}")


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


def is_complete(directory: str | Path) -> bool:
    directory = Path(directory)
    return not directory.name.startswith(".") and (directory / COMPLETE).exists()


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
        dcp.load(state, checkpoint_id=str(directory), planner=_plain_data_planner())
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


def verify_checkpoint(directory: str | Path) -> None:
    """Everything a resume reads, checked before anything is loaded: the directory is a complete
    checkpoint, its files match ``checksums.sha256`` (none changed, none added), ``.metadata``
    holds only checkpoint metadata, and ``trainer_state.json`` is JSON. Raises a one-line
    :class:`~kdlib.errors.CheckpointError`."""
    directory = Path(directory)
    if not directory.is_dir() or not is_complete(directory):
        raise CheckpointError(f"{directory} is not a complete kdlib checkpoint (no {COMPLETE})")
    if (directory / MANIFEST).exists():
        check_manifest(directory)
    for name in ("trainer_state.json",):
        if (directory / name).exists():
            try:
                json.loads((directory / name).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot read {directory / name}: {first_line(exc)}") from None
    check_metadata(directory)


# ----------------------------------------------------------------------------------------------
# Checksums: what was published is what is resumed


def write_manifest(directory: str | Path) -> Path:
    """``checksums.sha256``: the SHA-256 of every file of ``directory``, as ``sha256sum`` writes
    them (``cd DIR && sha256sum -c checksums.sha256`` checks a copy with standard tools)."""
    directory = Path(directory)
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    lines = [f"{digest}  {name}\n" for name, digest in zip(names, _digests(directory, names))]
    path = directory / MANIFEST
    path.write_text("".join(lines), encoding="utf-8")
    return path


_MANIFEST_LINE = re.compile(r"([0-9a-f]{64}) [ *]([^/\x00]+)")


def check_manifest(directory: str | Path) -> None:
    """Refuse ``directory`` when a file differs from ``checksums.sha256``, is missing, or is not
    listed (an added ``extra_rank1.json`` would be loaded)."""
    directory = Path(directory)
    listed: dict[str, str] = {}
    for number, line in enumerate((directory / MANIFEST).read_text(encoding="utf-8").splitlines(), start=1):
        match = _MANIFEST_LINE.fullmatch(line)
        if match is None or match.group(2) in (".", ".."):
            raise CheckpointError(f"{directory / MANIFEST}, line {number}: not a sha256sum line")
        listed[match.group(2)] = match.group(1)
    present = sorted(p.name for p in directory.iterdir() if p.name != MANIFEST)
    unlisted = [name for name in present if name not in listed]
    if unlisted:
        raise CheckpointError(f"{directory}: {unlisted[0]} is not listed in {MANIFEST}; the checkpoint was changed "
                              "after it was written, refused")
    absent = [name for name in listed if not (directory / name).is_file()]
    if absent:
        raise CheckpointError(f"{directory}: {absent[0]} is missing (listed in {MANIFEST})")
    names = sorted(listed)
    for name, digest in zip(names, _digests(directory, names)):
        if digest != listed[name]:
            raise CheckpointError(f"{directory}: {name} differs from its checksum in {MANIFEST}; the checkpoint was "
                                  "damaged or changed after it was written, refused")


def _digests(directory: Path, names: list[str]) -> list[str]:
    """SHA-256 of each file, several at once (hashlib releases the GIL while it hashes)."""

    def digest(name: str) -> str:
        with open(directory / name, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(names)), os.cpu_count() or 1)) as pool:
        return list(pool.map(digest, names))


# ----------------------------------------------------------------------------------------------
# DCP's pickles, read only as plain data

_METADATA_TYPES = {  # non-DCP globals a .metadata pickle uses (DCP's own dataclasses and enums pass)
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch._utils", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP writes into ``.metadata``: its own dataclasses and enums, torch
    sizes, dtypes and layouts, paths; any other global (a function to call) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        import dataclasses
        import enum

        obj = getattr(sys.modules.get(module), name, None) if "." not in name else None
        if (module, name) in _METADATA_TYPES and obj is not None:
            return obj
        if module == "torch" and isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            return obj
        if module.startswith("torch.distributed.checkpoint.") and isinstance(obj, type) and (
            dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)
        ):
            return obj
        raise pickle.UnpicklingError(f"it names {module}.{name}, which checkpoint metadata never holds")


def check_metadata(directory: str | Path) -> None:
    """Read ``.metadata`` with :class:`_MetadataUnpickler` before DCP unpickles it for real."""
    import torch.distributed.checkpoint  # noqa: F401 (the metadata types must be importable)
    import torch.distributed.checkpoint.filesystem  # noqa: F401

    path = Path(directory) / METADATA
    if not path.is_file():
        raise CheckpointError(f"{directory}: {METADATA} is missing; it is not a complete checkpoint")
    try:
        with open(path, "rb") as handle:
            _MetadataUnpickler(handle).load()
    except Exception as exc:  # UnpicklingError, EOFError, ...: a damaged or crafted file
        raise CheckpointError(f"cannot read {path}: {first_line(exc)}; refused") from None


def _plain_data_planner():
    """DCP's default load planner, except that the non-tensor values of the shards (optimizer
    settings) must pass torch's ``weights_only`` loader first (DCP itself unpickles them freely)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class PlainDataLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            data = value.getvalue()
            try:
                torch.load(io.BytesIO(data), weights_only=True)
            except Exception as exc:
                raise CheckpointError(f"the value {read_item.dest_index.fqn} is not plain data ({first_line(exc)})") from None
            super().load_bytes(read_item, io.BytesIO(data))

    return PlainDataLoadPlanner()


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


# ----------------------------------------------------------------------------------------------
# Checkpoints of older versions


def convert_pickled_state(directory: str | Path) -> list[Path]:
    """Rewrite the pickled ``extra_rank<r>.pt`` of a checkpoint written by an older kdlib as
    :func:`save_extra_state` writes it, and write its checksums. Only for a checkpoint you trust:
    loading the pickle runs whatever it holds."""
    directory = Path(directory)
    pickled = sorted(directory.glob("extra_rank*.pt"))
    if not pickled:
        raise CheckpointError(f"{directory}: no extra_rank<r>.pt to convert")
    for path in pickled:
        save_extra_state(directory, int(path.stem.removeprefix("extra_rank")), torch.load(path, weights_only=False))
        path.unlink()
    write_manifest(directory)
    return pickled


def main(argv: list[str]) -> int:
    """``python -m kdlib.parallel.checkpoint convert DIR``: see :func:`convert_pickled_state`."""
    if len(argv) != 2 or argv[0] != "convert":
        print("usage: python -m kdlib.parallel.checkpoint convert CHECKPOINT_DIR  (a checkpoint you trust: "
              "its pickled state is loaded)", file=sys.stderr)
        return 2
    try:
        converted = convert_pickled_state(argv[1])
    except CheckpointError as exc:
        print(f"kdlib: error: {exc}", file=sys.stderr)
        return 2
    print(f"converted {', '.join(p.name for p in converted)} in {argv[1]}; it resumes with this kdlib")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
