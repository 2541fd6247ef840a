"""The offline teacher cache: exact reuse, no teacher model when covered, safe sharing, refusal."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import kdlib
from kdlib.demo.text import chat_rows
from kdlib.errors import ConfigError
from kdlib.cache.store import TeacherCache
from kdlib.runner import built


def _rows(result) -> list[dict]:
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(result.student_dir / "model.safetensors")


def assert_same_training(a, b) -> None:
    """Bit-identical losses at every step, held-out metrics and final weights."""
    for ra, rb in zip(_rows(a), _rows(b), strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            assert ra[key] == rb[key], key
    assert a.eval_before == b.eval_before and a.eval_after == b.eval_after
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def cached_overrides(tiny_overrides, tmp_path):
    # bf16 on the wire (the default) and a bf16 teacher: what a real cache holds
    return [o for o in tiny_overrides if not o.startswith("teacher.dtype")] + [
        "teacher.dtype=bfloat16", f"teacher.cache={tmp_path / 'cache'}", "train.max_steps=3",
    ]


def test_training_from_the_cache_equals_training_with_the_live_teacher(cached_overrides, tmp_path):
    live = kdlib.run(kdlib.compose([o for o in cached_overrides if not o.startswith("teacher.cache")]
                                   + [f"output_dir={tmp_path / 'live'}"]))
    filling = kdlib.run(kdlib.compose(cached_overrides + [f"output_dir={tmp_path / 'fill'}"]))
    assert_same_training(live, filling)  # writing the cache changes nothing
    assert _rows(filling)[0]["teacher_cached_batches"] == 0

    cfg = kdlib.compose(cached_overrides + [f"output_dir={tmp_path / 'read'}"])
    with built(cfg, run_dir=tmp_path / "probe") as loop:
        assert loop.pipeline.teacher is None  # covered: no teacher model is loaded
    reading = kdlib.run(cfg)
    assert_same_training(live, reading)
    assert all(r["teacher_cached_batches"] == r["micro_batches"] for r in _rows(reading))
    assert all(r["transport_bytes"] > 0 for r in _rows(reading))


def test_cache_mode_fills_what_training_reads(cached_overrides, tmp_path):
    fill = kdlib.run(kdlib.compose(cached_overrides + ["+recipe=cache_teacher", f"teacher.cache={tmp_path / 'cache'}",
                                                       f"output_dir={tmp_path / 'fill'}"]))
    m = fill.metrics
    distinct = {json.dumps(r["messages"]) for r in chat_rows(24, seed=0) + chat_rows(8, seed=1)}
    assert m["samples"] == m["samples_computed"] == 24 + 8
    assert m["cached_samples_total"] == len(distinct) < 32  # equal conversations share one entry
    assert m["tokens"] > 0 and m["bytes_per_token"] >= 64 * 2  # hidden 64 in bf16, plus headers
    assert json.loads((tmp_path / "cache" / "index.json").read_text())
    again = kdlib.run(kdlib.compose(cached_overrides + ["+recipe=cache_teacher", f"teacher.cache={tmp_path / 'cache'}",
                                                        f"output_dir={tmp_path / 'again'}"]))
    assert again.metrics["samples_computed"] == 0 and again.metrics["samples_already_cached"] == 32

    live = kdlib.run(kdlib.compose([o for o in cached_overrides if not o.startswith("teacher.cache")]
                                   + [f"output_dir={tmp_path / 'live'}"]))
    reading = kdlib.run(kdlib.compose(cached_overrides + [f"output_dir={tmp_path / 'read'}"]))
    assert_same_training(live, reading)  # the fill planned the same micro-batches as training


def test_a_damaged_shard_is_set_aside_and_recomputed(cached_overrides, tmp_path, caplog):
    first = kdlib.run(kdlib.compose(cached_overrides + [f"output_dir={tmp_path / 'first'}"]))
    shards = sorted((tmp_path / "cache" / "shards").glob("*.safetensors"))
    assert len(shards) >= 2
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])  # truncated
    flipped = bytearray(shards[1].read_bytes())
    flipped[-3] ^= 0xFF  # one bit pattern changed inside a tensor
    shards[1].write_bytes(bytes(flipped))
    (tmp_path / "cache" / "index.json").unlink(missing_ok=True)

    cfg = kdlib.compose(cached_overrides + [f"output_dir={tmp_path / 'second'}"])
    with caplog.at_level("WARNING"):
        second = kdlib.run(cfg)
    assert "is damaged" in caplog.text
    assert (tmp_path / "cache" / "shards" / shards[0].with_suffix(".corrupt").name).exists()
    assert_same_training(first, second)  # the damaged samples were recomputed, not trusted


def test_damage_found_mid_run_is_recomputed_by_a_teacher_loaded_then(cached_overrides, tmp_path, caplog):
    """The cache covered every sample when the run was built (no teacher loaded); then a shard is
    damaged (truncated) and another deleted while the run goes on: the students cannot read them,
    the step runs on no rank, the teacher is loaded, computes those samples again (and stores
    them again), and the run ends exactly as the run with the live teacher did."""
    # no held-out evaluation before training: it would meet the damage first, set the shards aside
    # and leave the training samples simply missing (computed as misses, not recomputed mid-step)
    live = kdlib.run(kdlib.compose([o for o in cached_overrides if not o.startswith("teacher.cache")]
                                   + [f"output_dir={tmp_path / 'live'}", "eval.before=false"]))
    kdlib.run(kdlib.compose(cached_overrides + [f"output_dir={tmp_path / 'fill'}"]))
    cfg = kdlib.compose(cached_overrides + [f"output_dir={tmp_path / 'read'}", "eval.before=false"])
    with caplog.at_level("WARNING"), built(cfg, run_dir=tmp_path / "read") as loop:
        assert loop.pipeline.teacher is None  # covered: no teacher model is loaded
        # two shards holding training samples (shard names are random: some hold only held-out ones)
        reading = TeacherCache.for_reading(tmp_path / "cache")
        train_keys = {s.teacher_key() for s in loop.pipeline.data.train}
        held = sorted({loc.shard for key, loc in reading._index.items() if key in train_keys})
        shards = [tmp_path / "cache" / "shards" / name for name in held]
        assert len(shards) >= 2
        data = shards[0].read_bytes()
        shards[0].write_bytes(data[: len(data) // 2])
        shards[1].unlink()
        result = loop.run()
    assert "loading the teacher to compute them again" in caplog.text
    assert_same_training(live, result)
    rows = _rows(result)
    assert sum(r["teacher_recomputed_batches"] for r in rows) >= 1
    fresh = TeacherCache.for_reading(tmp_path / "cache")
    assert len(fresh) >= 24  # the recomputed samples were stored again


def test_a_cache_of_another_teacher_is_refused(cached_overrides, tiny_qwen3, tmp_path):
    kdlib.run(kdlib.compose(cached_overrides + ["+recipe=cache_teacher", f"output_dir={tmp_path / 'fill'}"]))
    other = kdlib.compose(cached_overrides + [f"teacher.model={tiny_qwen3}", f"output_dir={tmp_path / 'other'}"])
    with pytest.raises(ConfigError, match=r"holds outputs of another teacher setup .*weights \(cache: \w+, this run: \w+\)"):
        kdlib.run(other)
    fp32 = kdlib.compose(cached_overrides + ["teacher.dtype=float32", f"output_dir={tmp_path / 'fp32'}"])
    with pytest.raises(ConfigError, match=r"dtype \(cache: bfloat16, this run: float32\)"):
        kdlib.run(fp32)


@pytest.mark.parametrize("signal, bytes_per_row", [
    (["teacher.signal.kind=topk", "teacher.signal.k=8"], 8 * (2 + 4) + 4),  # uint16 ids, float32 log-probs, tail
    (["teacher.signal.kind=sampled", "teacher.signal.k=4"], 4 * (2 + 4)),
])
def test_a_cache_of_a_signal_trains_as_the_live_signal_and_serves_no_other(cached_overrides, tmp_path, signal,
                                                                           bytes_per_row):
    """A cache stores the configured teacher signal (its bytes per token in the summary, below the
    hidden states' 128), training from it equals training with the live teacher (a sample's draws
    are seeded by its content), no teacher model loads when it covers the run, and a run asking for
    another signal is refused in one line."""
    overrides = cached_overrides + signal
    fill = kdlib.run(kdlib.compose(overrides + ["+recipe=cache_teacher", f"output_dir={tmp_path / 'fill'}"]))
    report = json.loads((fill.run_dir / "cache_report.json").read_text())
    assert report["signal"].startswith(signal[0].split("=")[1]) and report["bytes_per_token"] == fill.metrics["bytes_per_token"]
    assert bytes_per_row <= fill.metrics["bytes_per_token"] < 64 * 2
    live = kdlib.run(kdlib.compose([o for o in overrides if not o.startswith("teacher.cache")]
                                   + [f"output_dir={tmp_path / 'live'}"]))
    cfg = kdlib.compose(overrides + [f"output_dir={tmp_path / 'read'}"])
    with built(cfg, run_dir=tmp_path / "probe") as loop:
        assert loop.pipeline.teacher is None
    reading = kdlib.run(cfg)
    assert_same_training(live, reading)
    assert all(r["teacher_cached_batches"] == r["micro_batches"] for r in _rows(reading))
    for other in (["teacher.signal.kind=hidden"], signal + ["teacher.signal.k=5"]):
        with pytest.raises(ConfigError) as caught:
            kdlib.run(kdlib.compose(overrides + other + [f"output_dir={tmp_path / 'other'}"]))
        message = str(caught.value)
        assert f"holds the teacher signal '{report['signal']}'" in message and "\n" not in message


_WRITER = """
import sys, torch
from kdlib.cache.fingerprint import CacheNamespace, FORMAT
from kdlib.cache.store import TeacherCache
from kdlib.teacher_output import TeacherOutput
ns = CacheNamespace(FORMAT, "w", "t", "bfloat16", "hf", "sdpa", "cpu", "tok", "bfloat16")
cache = TeacherCache.open(sys.argv[1], ns)
g = torch.Generator().manual_seed(0)  # both writers write the same values for the same keys
for i in range(40):
    rows = 1 + i % 5
    cache.write({f"{i:032x}": TeacherOutput(torch.randn(rows, 16, generator=g).bfloat16(), row_offsets=torch.tensor([0, rows]))})
"""


def test_concurrent_writers_leave_a_valid_cache(tmp_path):
    from kdlib.cache.fingerprint import FORMAT, CacheNamespace
    from kdlib.cache.store import TeacherCache

    root = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(root)]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    ns = CacheNamespace(FORMAT, "w", "t", "bfloat16", "hf", "sdpa", "cpu", "tok", "bfloat16")
    cache = TeacherCache.open(root, ns)
    keys = [f"{i:032x}" for i in range(40)]  # sample keys are 32 hex digits
    assert not cache.missing(keys) and cache.stats.corrupt == 0
    out = cache.read(keys)
    assert out is not None and out.row_offsets.tolist()[-1] == sum(1 + i % 5 for i in range(40))
    assert not list(root.rglob("*.tmp"))  # no half-written file left behind
