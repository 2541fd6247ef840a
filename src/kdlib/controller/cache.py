"""``mode=cache`` (``+recipe=cache_teacher``): run the teacher once over the data, fill teacher.cache.

The samples are those an off-policy run of the same config trains and evaluates on (same
tokenisation, filtering and truncation), planned into the same micro-batches as its first epoch and
its evaluations, so a later run of that config reads outputs computed on exactly the batches it
would have given a live teacher (bit-identical training; see docs/teacher_cache.md). Samples already
in the cache are skipped; several teacher workers (``launcher=ray teacher.num_workers=N``) share the
work, one global batch ahead of the one being collected. The run ends with a summary: samples,
tokens, bytes on disk and bytes per token.
"""

from __future__ import annotations

import logging

from kdlib.config.schema import KDConfig
from kdlib.config.teachers import config_key, named_teachers
from kdlib.controller.dispatch import TeacherDispatch
from kdlib.controller.routed_dispatch import RoutedDispatch
from kdlib.controller.teachers import teacher_keys
from kdlib.controller.mode import Needs, RunMode, TeacherNeed
from kdlib.data.batching import global_batches
from kdlib.errors import ConfigError
from kdlib.progress import progress
from kdlib.result import RunResult
from kdlib.tracking import write_json

log = logging.getLogger(__name__)


class CacheMode(RunMode):
    @classmethod
    def check(cls, cfg: KDConfig) -> None:
        if not (cfg.teacher.cache or any(t.cache for t in cfg.teachers.values())):
            raise ConfigError("mode=cache needs teacher.cache=DIR: the directory to fill with teacher outputs")
        if cfg.student.model in (None, "???"):
            raise ConfigError("student.model is not set (mode=cache tokenises the data as the student's run will)")

    @classmethod
    def needs(cls, cfg: KDConfig) -> Needs:
        return Needs(responses=True, teacher=TeacherNeed.uncached, students=False)

    def run(self) -> RunResult:
        p, cfg = self.pipeline, self.cfg
        data, cache = p.data, p.cache
        rounds = [
            p.data.step_batches(samples, cfg.train, cfg.student.num_workers)[1]
            for samples in global_batches(data.train, batch_size=cfg.train.global_batch_size,
                                          shuffle=cfg.data.shuffle, seed=cfg.seed, epochs=1)
        ]
        if data.eval:
            rounds.append(data.eval_batches(cfg.eval.batch_size))
        n_samples = len(data.train) + len(data.eval)
        caches = self._caches()
        missing_before = sum(len(c.verified_missing(keys)) for c, keys in caches)
        dispatch = RoutedDispatch(p.teachers) if p.teachers is not None else TeacherDispatch(p.teacher, cache)
        computed_seconds = 0.0
        with progress("filling teacher cache", total=n_samples, unit="sample", enabled=cfg.logging.progress) as bar:
            pending = None
            for batches in rounds + [None]:
                job = dispatch.submit(batches, publish=False) if batches is not None else None
                if pending is not None:
                    done, pending_batches = dispatch.collect(pending[0]), pending[1]
                    computed_seconds += done.seconds
                    bar.update(sum(len(b.sample_ids) for b in pending_batches))
                pending = (job, batches) if job is not None else None
        for cache, keys in caches:
            cache.refresh()
            missing_after = len(cache.verified_missing(keys))
            if missing_after:
                raise ConfigError(f"teacher cache {cache.root}: {missing_after} samples are still missing after the fill")
            cache.write_index()
        rows, disk = sum(c.total_rows() for c, _ in caches), sum(c.disk_bytes() for c, _ in caches)
        summary = {
            "samples": float(n_samples),
            "samples_computed": float(missing_before),
            "samples_already_cached": float(n_samples - missing_before),
            "cached_samples_total": float(sum(len(c) for c, _ in caches)),
            "tokens": float(rows),
            "bytes_on_disk": float(disk),
            "bytes_per_token": disk / max(rows, 1),
            "teacher_seconds": computed_seconds,
        }
        roots = ", ".join(str(c.root) for c, _ in caches)
        signal = ", ".join(sorted({t.signal.describe() for t in named_teachers(cfg).values()}))
        write_json(p.run_dir / "cache_report.json", {"cache": roots, "signal": signal, **summary})
        log.info(
            "teacher cache %s (%s): %d samples (%d computed now, %d already there), %d tokens, %.1f MiB on disk, "
            "%.0f bytes per token", roots, signal, n_samples, missing_before, n_samples - missing_before, rows,
            disk / 2**20, summary["bytes_per_token"],
        )
        return RunResult(run_dir=p.run_dir, metrics=summary, outputs={"teacher_cache": caches[0][0].root})

    def _caches(self) -> list:
        """(cache, the keys it must hold) of every teacher that fills one: the run's teacher's over
        every sample, or with several teachers each one's over the samples it scores."""
        p = self.pipeline
        if p.teachers is None:
            return [(p.cache, [s.teacher_key() for s in [*p.data.train, *p.data.eval]])]
        without = [n for n in p.teachers.names if p.teachers.caches[n] is None]
        if without:
            raise ConfigError(f"mode=cache: samples are routed to {without[0]}, which has no cache: set "
                              f"{config_key(without[0])}.cache=DIR")
        return [(p.teachers.caches[n], teacher_keys(p.data, n)) for n in p.teachers.names]
