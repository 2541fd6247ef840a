"""What kdlib reads from a checkpoint, and why loading one runs nothing it holds.

kdlib's own per-rank state (scheduler, RNG states of python / numpy / torch / CUDA, the step) is
``extra_rank<r>.json`` with its tensors in ``extra_rank<r>.safetensors``, read without pickle; a
checkpoint of an older version, whose state is a pickle (``extra_rank<r>.pt``), is refused
(``python -m kdlib.parallel.checkpoint_files convert DIR`` rewrites one you trust). DCP's own files
hold pickles too: ``.metadata`` is first read by a restricted unpickler that admits only
checkpoint-metadata types, and the non-tensor values of the shards (optimizer settings) are read by
torch's ``weights_only`` loader before DCP reads them. ``checksums.sha256`` (``sha256sum -c``
format) lists every file; a resume refuses a checkpoint whose files differ from it
(docs/reliability.md, "What is trusted").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdlib.errors import CheckpointError, first_line

COMPLETE = ".complete"


MANIFEST = "checksums.sha256"


METADATA = ".metadata"  # DCP's index of the shards (a pickle)


EXTRA_FORMAT = "kdlib-checkpoint-extra/1"


_TAG = "__kdlib__"  # marks the JSON objects that stand for a tuple, a tensor, an array, ...


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
                f"`python -m kdlib.parallel.checkpoint_files convert {directory}`"
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


def is_complete(directory: str | Path) -> bool:
    directory = Path(directory)
    return not directory.name.startswith(".") and (directory / COMPLETE).exists()


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


def plain_data_planner():
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
    """``python -m kdlib.parallel.checkpoint_files convert DIR``: see :func:`convert_pickled_state`."""
    if len(argv) != 2 or argv[0] != "convert":
        print("usage: python -m kdlib.parallel.checkpoint_files convert CHECKPOINT_DIR  (a checkpoint you trust: "
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
