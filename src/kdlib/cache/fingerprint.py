"""Fingerprints of everything that changes a teacher's output, and the key of one sample.

A cached teacher output may be reused only when the run would compute the same thing. What
decides it is split in two:

- the *namespace* of a cache directory: the teacher's weights (content hash of its checkpoint
  files), its config, inference dtype, backend, attention implementation and device type, the
  tokenizer (vocabulary, special tokens) and chat template, and the wire dtype. A directory holds
  one namespace; a run with another is refused with the field that differs.
- the *key* of a sample within it: the exact teacher token ids and the positions whose hidden
  states are kept (the response span), and the pixels of its images, hashed.

For a vision-language teacher the namespace's tokenizer entry also covers the processor's image
settings, which change the image tokens and pixels of every sample.

Weight hashes read every byte of the checkpoint once; they are remembered per file (path, size,
modification time) in kdlib's user cache, so a sweep hashes a 60 GB teacher once, not per job.
"""

from __future__ import annotations

import hashlib
from array import array
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

from filelock import FileLock

from kdlib.locations import cache_dir

FORMAT = "kdlib-teacher-cache/1"
_CHUNK = 1 << 22


@dataclass(frozen=True)
class CacheNamespace:
    """Everything outside a sample that changes the teacher's output for it."""

    format: str
    # Content hash of the teacher's weight files and config.json.
    weights: str
    # The teacher as configured (for messages only; `weights` decides).
    teacher_model: str
    dtype: str
    backend: str
    attn_implementation: str
    device_type: str
    # Hash of the tokenizer's vocabulary, special tokens and the chat template in use (and of the
    # processor's image settings for a vision-language teacher).
    tokenizer: str
    wire_dtype: str
    # What the teacher sends (teacher.signal, described: "hidden", "topk k=32 tail", ...); a cache
    # of one signal cannot serve another. Manifests written before signals existed hold hidden states.
    signal: str = "hidden"

    def differences(self, other: "CacheNamespace") -> list[str]:
        """Human-readable fields in which ``other`` differs (``cache: a, this run: b``)."""
        out = []
        for f in fields(self):
            if f.name == "teacher_model":
                continue
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{f.name} (cache: {mine}, this run: {theirs})")
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def sample_key(input_ids: Sequence[int], response_start: int, images: Sequence[str] = ()) -> str:
    """The key of one sample: its teacher token ids and where its trained span starts (the rows
    kept are the positions response_start - 1 .. len - 2), and for image+text samples the content
    digests of its images in order (:func:`kdlib.data.images.image_digest`)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(array("q", [len(input_ids), int(response_start)]).tobytes())
    digest.update(array("q", input_ids).tobytes())
    for image in images:
        digest.update(f"image:{image}".encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer, *, apply_chat_template: bool) -> str:
    """Stable across processes (no Python ``hash``): vocabulary, special tokens, template."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    digest.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    digest.update(json.dumps([apply_chat_template, getattr(tokenizer, "chat_template", None)]).encode())
    return digest.hexdigest()[:32]


def processor_fingerprint(processor, *, apply_chat_template: bool) -> str:
    """A vision-language teacher's rendering: its tokenizer (as above), its chat template and its
    processor's settings (image size, tiling, patching, normalisation change tokens and pixels)."""
    digest = hashlib.sha256(tokenizer_fingerprint(processor.tokenizer, apply_chat_template=apply_chat_template).encode())
    digest.update(json.dumps([getattr(processor, "chat_template", None), processor.to_json_string()]).encode())
    return digest.hexdigest()[:32]


def weights_fingerprint(location: str) -> str:
    """Content hash of a checkpoint directory's weight files and config.json."""
    directory = Path(location)
    if not directory.is_dir():
        directory = _hub_snapshot(location)
    files = sorted(
        p for p in directory.iterdir()
        if p.is_file() and (p.suffix in {".safetensors", ".bin", ".pt", ".gguf"} or p.name == "config.json")
    )
    if not any(p.suffix != ".json" for p in files):
        raise FileNotFoundError(f"{location}: no weight files to fingerprint")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(_file_hash(path).encode())
    return digest.hexdigest()[:32]


def _file_hash(path: Path) -> str:
    """sha256 of a file's bytes, remembered by (real path, size, mtime) in kdlib's cache."""
    stat = path.stat()
    memo_key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo_path = cache_dir() / "file_hashes.json"
    with FileLock(str(memo_path) + ".lock"):
        memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
        if memo_key in memo:
            return memo[memo_key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    with FileLock(str(memo_path) + ".lock"):
        memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
        memo[memo_key] = value
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    return value


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot directory of a hub checkpoint (it must be in the HF cache already)."""
    from transformers.utils import cached_file

    found = cached_file(repo_id, "config.json")
    return Path(found).parent
