"""Reading raw rows with ``datasets``: local files, saved dataset directories, hub datasets.

Whatever the source, the result is a ``datasets.Dataset`` plus a human-readable name used in every
error message about its rows. A missing file is reported with the config key that named it; a
malformed JSON Lines file, or a text file that is not UTF-8, is reported with the line number,
which ``datasets`` itself does not give.
"""

from __future__ import annotations

import codecs
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from kdlib.errors import DataError, first_line
from kdlib.locations import looks_like_path, resolve_location

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class RowSource:
    """Rows of one dataset and where they came from."""

    rows: "datasets.Dataset"  # noqa: F821 (datasets is imported lazily)
    name: str  # file path or hub name, for messages
    key: str  # the config key that named it (data.train, data.eval)
    # Rows after the first max_rows, left out on request, and the option that asked.
    beyond_limit: int = 0
    limit_key: str = ""

    def where(self, row: int) -> str:
        """'<name>, row <n>' (1-based, as in an editor), for error messages."""
        return f"{self.name}, row {row + 1}"


def load_rows(spec: str, *, split: str, key: str, max_rows: int | None = None,
              limit_key: str = "") -> RowSource:
    """Load the dataset named by config key ``key`` (value ``spec``), its first ``max_rows`` rows
    if given (``limit_key`` names the option that set it, for the filter report)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        location = resolve_location(spec)
    except FileNotFoundError as exc:
        raise DataError(f"{key}: {exc}") from None
    path = Path(location)
    if path.is_file():
        rows = _load_file(path, key)
    elif path.is_dir():
        rows = _load_directory(path, split, key)
    elif looks_like_path(spec):
        raise DataError(f"{key}: file not found: {location}")
    else:
        try:
            rows = datasets.load_dataset(spec, split=split)
        except Exception as exc:  # network, unknown name, bad split: one line is what helps
            raise DataError(f"{key}: cannot load hub dataset {spec!r} (split {split!r}): {exc}") from None
    beyond = 0
    if max_rows is not None and len(rows) > max_rows:
        beyond = len(rows) - max_rows
        rows = rows.select(range(max_rows))
    return RowSource(rows=rows, name=str(location), key=key, beyond_limit=beyond, limit_key=limit_key)


def _load_file(path: Path, key: str):
    import datasets

    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"{key}: unsupported file type {path.suffix!r} ({path}); use one of "
            f"{', '.join(sorted(_FILE_BUILDERS))} or a saved dataset directory"
        )
    if path.suffix.lower() == ".jsonl":
        _check_jsonl(path, key)
    elif builder in ("json", "csv"):
        _check_utf8(path, key)
    try:
        with _quiet_datasets():
            return datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as exc:
        raise DataError(f"{key}: cannot read {path}: {_first_line(exc)}") from None


def _load_directory(path: Path, split: str, key: str):
    import datasets

    if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists() or (
        path / "state.json"
    ).exists():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{key}: {path} has splits {sorted(loaded)}, not {split!r}")
            return loaded[split]
        return loaded
    try:
        with _quiet_datasets():
            return datasets.load_dataset(str(path), split=split)
    except Exception as exc:
        raise DataError(f"{key}: cannot read dataset directory {path}: {_first_line(exc)}") from None


def _check_jsonl(path: Path, key: str) -> None:
    """Name the first bad line of a JSON Lines file (datasets' own error does not)."""
    with path.open("rb") as handle:
        n_rows = 0
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(_not_utf8(key, path, number, exc)) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{key}: {path}, line {number}: invalid JSON ({exc.msg})") from None
            if not isinstance(value, dict):
                raise DataError(f"{key}: {path}, line {number}: expected a JSON object per line")
            n_rows += 1
    if n_rows == 0:
        raise DataError(f"{key}: {path} has no rows")


def _check_utf8(path: Path, key: str, chunk_bytes: int = 1 << 20) -> None:
    """Name the line of the first byte that is not UTF-8 (datasets reports a bare codec error)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines_before = 0
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:  # exc.object: the bytes left from the last chunk + this one
                number = lines_before + exc.object.count(b"\n", 0, exc.start) + 1
                raise DataError(_not_utf8(key, path, number, exc)) from None
            if not chunk:
                return
            lines_before += chunk.count(b"\n")


def _not_utf8(key: str, path: Path, number: int, exc: UnicodeDecodeError) -> str:
    byte = exc.object[exc.start : exc.start + 1].hex()
    return (f"{key}: {path}, line {number}: not UTF-8 text (byte 0x{byte}: {exc.reason}); "
            "save the file as UTF-8")


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets logs a failed file read at ERROR before raising; the DataError says it once."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    """:func:`kdlib.errors.first_line` of the innermost exception in the cause chain: datasets
    wraps the error that names the problem in a generic one ("An error occurred while generating
    the dataset")."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return first_line(exc)
