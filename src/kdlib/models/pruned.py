"""The student pruned by importance, once: where its checkpoint is kept, and making it.

``student.prune`` is settled into a directory of kdlib's cache (``student.prune.output``) when the
run's config is resolved: a key of the source model's weights, the data the importance is measured
on and every pruning setting. :func:`ensure_pruned` makes the checkpoint there the first time
(importance on calibration tokens of ``data.train``, rendered with the source model's own
tokenizer), under a file lock so that the jobs of a sweep wait for one another rather than prune
twice; every later run with the same key reuses it. The run directory gets a copy of the scores,
the plot and what was kept (``pruning/``). Workers load the directory like any checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from kdlib.config.models import ModelConfig
from kdlib.config.schema import KDConfig
from kdlib.errors import ConfigError
from kdlib.locations import cache_dir, resolve_location

log = logging.getLogger(__name__)

COMPLETE = ".complete"
# Bumped when the pruned checkpoints of this code would differ from older ones for the same key.
FORMAT = "kdlib-pruned/1"


def _source(cfg: KDConfig) -> ModelConfig:
    """The model pruned: the student checkpoint, with its own tokenizer (not student.tokenizer)."""
    student = cfg.student
    return ModelConfig(model=student.model, revision=student.revision, dtype=student.dtype,
                       trust_remote_code=student.trust_remote_code, chat_template=student.chat_template)


def pruned_directory(cfg: KDConfig) -> Path:
    """The cache directory of the student ``cfg`` prunes (nothing is computed or written here)."""
    from kdlib.cache.fingerprint import weights_fingerprint
    from kdlib.models.loading import model_location
    from kdlib.models.vlm import checkpoint_is_vision_language

    student = cfg.student
    if checkpoint_is_vision_language(student):
        raise ConfigError("student.prune prunes text models in a run; for a vision-language student use "
                          "student.num_layers / student.keep_layers, or kdlib.pruning.prune_to_directory "
                          "(docs/pruning.md)")
    data = cfg.data
    train = Path(resolve_location(data.train))
    key = {
        "format": FORMAT,
        "weights": weights_fingerprint(model_location(student.model)),
        "revision": student.revision,
        "prune": student.prune.as_dict(),
        "data": [str(train), _content_hash(train), data.train_split, data.max_samples, data.max_len,
                 data.format.value, data.apply_chat_template, student.chat_template],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir() / "pruned" / digest


def ensure_pruned(cfg: KDConfig, run_dir: Path, *, progress: bool = True) -> Path:
    """The pruned checkpoint of ``cfg`` (made now unless the cache has it); copies its scores and
    plot into ``run_dir/pruning``."""
    from filelock import FileLock

    from kdlib.progress import phase

    directory = Path(cfg.student.prune.output)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory) + ".lock"):
        if not (directory / COMPLETE).exists():
            rows = _calibration_rows(cfg)
            staging = directory.with_name(directory.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            prune = cfg.student.prune
            with phase(f"pruning the student by {prune.depth.value} on {min(prune.calibration_tokens, sum(map(len, rows)))} "
                       "calibration tokens (once: later runs reuse it)", enabled=progress):
                from kdlib.models.loading import load_tokenizer, model_location
                from kdlib.pruning import prune_to_directory

                source = _source(cfg)
                prune_to_directory(model_location(source.model), load_tokenizer(source), rows, prune, staging)
            (staging / COMPLETE).touch()
            shutil.rmtree(directory, ignore_errors=True)
            staging.rename(directory)
        else:
            log.info("student: pruned checkpoint %s (made by an earlier run with the same source, data and "
                     "settings)", directory)
    kept = run_dir / "pruning"
    kept.mkdir(parents=True, exist_ok=True)
    for name in ("scores.json", "importance.png", "prune.json"):
        if (directory / name).exists():
            shutil.copy2(directory / name, kept / name)
    result = json.loads((directory / "prune.json").read_text(encoding="utf-8"))
    log.info("student: %s pruned to %s of %s parameters (layers %s); scores and plot in %s",
             cfg.student.model, f"{result['params_after']:,}", f"{result['params_before']:,}",
             result["plan"]["layers"], kept)
    return directory


def _calibration_rows(cfg: KDConfig) -> list[list[int]]:
    """Token ids of data.train's samples as the source model's own tokenizer renders them."""
    from kdlib.data.encoding import ChatEncoder
    from kdlib.data.samples import build_samples
    from kdlib.models.loading import load_tokenizer

    encoder = ChatEncoder(load_tokenizer(_source(cfg)), apply_chat_template=cfg.data.apply_chat_template,
                          name="student")
    samples, _ = build_samples(cfg.data, "train", encoder)
    if not samples:
        raise ConfigError("student.prune: data.train has no usable sample to measure importance on")
    return [list(s.student.input_ids) for s in samples]


def _content_hash(path: Path) -> str:
    if not path.is_file():
        return str(path)  # a dataset directory or hub name: its name is the key
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
