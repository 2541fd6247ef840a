"""The Ray launcher: FSDP2 students, object-store transport, overlap, failures (local Ray, 2 CPUs)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import kdlib
from kdlib.errors import WorkerError
from kdlib.runner import built

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster for the module (the launcher joins it instead of starting its own)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tests = str(Path(__file__).resolve().parents[1])  # the actors import tests/fault_plugins.py
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


RAY = ["launcher=ray", "transport=ray", "student.num_workers=2", "eval.before=false"]


def _losses(result) -> list[dict]:
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ray_fsdp_reproduces_the_local_run(ray_cluster, tiny_overrides, tmp_path):
    """1 teacher + 2 FSDP2 students == the local launcher, step by step, and the same final weights."""
    from safetensors.torch import load_file

    local = kdlib.run(kdlib.compose(tiny_overrides + ["eval.before=false", f"output_dir={tmp_path / 'local'}"]))
    ray_run = kdlib.run(kdlib.compose(tiny_overrides + RAY + [f"output_dir={tmp_path / 'ray'}"]))
    for a, b in zip(_losses(local), _losses(ray_run), strict=True):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert ray_run.eval_after["kl"] == pytest.approx(local.eval_after["kl"], rel=1e-4)
    # the student gathered from the FSDP2 shards is the local student
    a = load_file(local.student_dir / "model.safetensors")
    b = load_file(ray_run.student_dir / "model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert _losses(ray_run)[-1]["transport_bytes"] > 0


def test_ray_cross_tokenizer_run_equals_local(ray_cluster, tiny_overrides, unigram_tokenizer_dir, tmp_path):
    """DSKD across tokenizers (a vocabulary-transferred student, alignments in the micro-batches,
    only the rows DSKD reads on the wire, projectors sharded by FSDP2 with the student): the local
    run's losses, metrics and student."""
    from safetensors.torch import load_file

    xtok = tiny_overrides + ["algorithm=dskd", f"student.tokenizer={unigram_tokenizer_dir}", "algorithm.projector_lr=1e-2"]
    local = kdlib.run(kdlib.compose(xtok + ["eval.before=false", f"output_dir={tmp_path / 'local'}"]))
    ray_run = kdlib.run(kdlib.compose(xtok + RAY + [f"output_dir={tmp_path / 'ray'}"]))
    for a, b in zip(_losses(local), _losses(ray_run), strict=True):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
        assert b["transport_bytes"] == a["transport_bytes"]
    for key in ("bits_per_byte", "teacher_bits_per_byte", "top1_agreement", "ce"):
        assert ray_run.eval_after[key] == pytest.approx(local.eval_after[key], rel=1e-4), key
    a = load_file(local.student_dir / "model.safetensors")
    b = load_file(ray_run.student_dir / "model.safetensors")
    assert sorted(a) == sorted(b) and not any("projector" in key for key in b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_object_store_transport_is_zero_copy_and_moves_every_field(ray_cluster):
    import ray

    from carrier_doubles import full_teacher_output
    from kdlib.config import TransportConfig
    from kdlib.transport.ray import RayObjectTransport

    transport = RayObjectTransport(TransportConfig(name="ray"))
    output = full_teacher_output()
    handle = transport.publish(output)
    fetched_output = transport.fetch(handle)
    fetched = fetched_output.hidden
    assert fetched.dtype == torch.bfloat16 and torch.equal(fetched, output.hidden)
    assert_same_output(fetched_output, output)
    arrays, _ = ray.get(handle.ref)
    array = arrays["hidden"][0]
    assert not array.flags.writeable  # a view of the shared-memory object, not a private copy
    assert fetched.data_ptr() == array.ctypes.data  # the tensor wraps that very buffer
    assert transport.fetch(handle).hidden.data_ptr() == fetched.data_ptr()  # and so does every fetch

    @ray.remote
    def student_side(h):
        import carrier_doubles  # noqa: F401 (registers the example alignment type in the actor, as a plugin would)

        out = RayObjectTransport(TransportConfig(name="ray")).fetch(h)
        arr = ray.get(h.ref)[0]["hidden"][0]
        return out.hidden.data_ptr() == arr.ctypes.data, out

    same_buffer, remote = ray.get(student_side.remote(handle))
    assert same_buffer
    assert_same_output(remote, output)


def assert_same_output(got, expected):
    """Every field of a teacher output, bit for bit."""
    from dataclasses import fields

    for f in fields(expected):
        a, b = getattr(got, f.name), getattr(expected, f.name)
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), f.name
        elif b is None:
            assert a is None, f.name
        else:  # a dataclass of tensors (alignment)
            assert type(a) is type(b), f.name
            for sub in fields(b):
                assert torch.equal(getattr(a, sub.name), getattr(b, sub.name)), f"{f.name}.{sub.name}"


def test_uneven_batch_loses_no_sample_and_prefetch_changes_nothing(ray_cluster, tiny_overrides, tmp_path):
    """5 samples over 2 workers in micro-batches of 2: shares 3 + 2, one weight-0 padding batch.
    The overlapped run also uses 2 teacher workers and HSDP (replicate 2 x shard 1)."""
    common = tiny_overrides + RAY + ["train.global_batch_size=5", "train.micro_batch_size=2", "train.max_steps=3"]
    variants = {0: [], 2: ["teacher.num_workers=2", "student.fsdp.shard_size=1"]}
    runs = {}
    for prefetch, extra in variants.items():
        cfg = kdlib.compose(common + extra + [f"pipeline.prefetch={prefetch}", f"output_dir={tmp_path / str(prefetch)}"])
        runs[prefetch] = _losses(kdlib.run(cfg))
    first = runs[0][0]
    assert first["samples"] == 5 and first["padding_micro_batches"] == 1 and first["micro_batches"] == 3
    for a, b in zip(runs[0], runs[2], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)

    # the same first step on one local worker: nothing lost, nothing counted twice
    local = kdlib.compose(tiny_overrides + ["train.global_batch_size=5", "train.micro_batch_size=2", "eval.before=false"])
    with built(local, run_dir=None) as loop:
        metrics = loop.step(next(loop.sample_batches()))
    assert metrics["loss_tokens"] == first["loss_tokens"]
    assert metrics["loss"] == pytest.approx(first["loss"], rel=1e-5)


def test_dead_worker_stops_the_run_with_its_name_and_the_checkpoint_loads(ray_cluster, tiny_overrides, tmp_path):
    from kdlib.parallel.checkpoint import latest_checkpoint

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = kdlib.compose(tiny_overrides + RAY + ["train.checkpoint_every=1", "train.max_steps=3"])
    with built(cfg, run_dir=run_dir) as loop:
        batches = loop.sample_batches()
        loop.step(next(batches))
        loop.save_checkpoint(1)
        os.kill(loop.pipeline.students.group.pids[1], signal.SIGKILL)
        with pytest.raises(WorkerError, match=r"student worker 1 \(pid \d+\) failed in StudentWorker\.train_step\(\): the worker process died"):
            loop.step(next(batches))
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None and checkpoint.name == "step_1"

    # the sharded checkpoint of 2 ranks resumes on one local worker and continues as an
    # uninterrupted run would (the Ray and local launchers agree to 1e-4, see above)
    local = tiny_overrides + ["train.max_steps=3", "eval.before=false"]
    result = kdlib.run(kdlib.compose(local + [f"train.resume={run_dir}", f"output_dir={tmp_path / 'resumed'}"]))
    uninterrupted = kdlib.run(kdlib.compose(local + [f"output_dir={tmp_path / 'uninterrupted'}"]))
    resumed_rows, expected_rows = _losses(result), _losses(uninterrupted)[1:]
    assert [row["step"] for row in resumed_rows] == [row["step"] for row in expected_rows] == [2, 3]
    for a, b in zip(expected_rows, resumed_rows, strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (b["step"], key)


def test_a_rank_that_died_is_named_before_a_survivor_whose_collective_broke(ray_cluster):
    """When one rank is killed, another's collective often fails first ("connection reset by
    peer"); the error names the rank that died, not the survivor."""
    import time

    import ray

    from kdlib.launch.ray import RayWorkerGroup

    @ray.remote(num_cpus=0)
    class Rank:
        def survive(self):
            time.sleep(0.2)
            raise RuntimeError("gloo: Read error: Connection reset by peer")

        def die(self):
            time.sleep(1.0)
            os._exit(1)

    survivor, dying = Rank.remote(), Rank.remote()
    group = RayWorkerGroup("student", [survivor, dying], pids=[11, 12])
    with pytest.raises(WorkerError, match=r"^student worker 1 \(pid 12\) failed in train_step\(\): the worker process died"):
        group.gather([survivor.survive.remote(), dying.die.remote()], "train_step")
    # a failure with no rank dying is still reported as it came
    with pytest.raises(WorkerError, match=r"^student worker 0 \(pid 11\) failed in train_step\(\): RuntimeError: gloo"):
        group.gather([survivor.survive.remote()], "train_step")


@pytest.mark.slow
def test_a_bad_update_is_skipped_on_every_rank(ray_cluster, tiny_overrides, tmp_path):
    """A NaN loss in one rank's micro-batch: both FSDP2 ranks skip the update (their shards stay
    one model), the run goes on, and it ends where the local run with the same fault ends."""
    from safetensors.torch import load_file

    poisoned = ["plugins=[fault_plugins]", "algorithm=fault_injection", "algorithm.nan_samples=[5]",
                "train.max_steps=3", "eval.before=false"]
    local = kdlib.run(kdlib.compose(tiny_overrides + poisoned + [f"output_dir={tmp_path / 'local'}"]))
    on_ray = kdlib.run(kdlib.compose(tiny_overrides + RAY + poisoned + [f"output_dir={tmp_path / 'ray'}"]))
    rows = _losses(on_ray)
    assert [r["skipped"] for r in rows] == [r["skipped"] for r in _losses(local)]
    assert sum(r["skipped"] for r in rows) == 1 and rows[-1]["skipped_steps"] == 1
    a, b = load_file(local.student_dir / "model.safetensors"), load_file(on_ray.student_dir / "model.safetensors")
    for key in a:
        assert torch.isfinite(b[key]).all(), key
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_ray_students_read_the_teacher_cache_bit_identically(ray_cluster, tiny_overrides, tmp_path):
    """Fill with 2 Ray teacher workers (mode=cache), then train on Ray from the cache alone: the same
    losses and weights as the live Ray run, and no teacher actor."""
    from test_teacher_cache import assert_same_training

    common = [o for o in tiny_overrides if not o.startswith("teacher.dtype")] + RAY + [
        "teacher.dtype=bfloat16", "eval.before=true",
    ]
    cache = f"teacher.cache={tmp_path / 'cache'}"
    live = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'live'}"]))
    fill = kdlib.run(kdlib.compose(common + [cache, "+recipe=cache_teacher", "teacher.num_workers=2",
                                             f"output_dir={tmp_path / 'fill'}"]))
    assert fill.metrics["samples_computed"] == fill.metrics["samples"] > 0
    cfg = kdlib.compose(common + [cache, f"output_dir={tmp_path / 'read'}"])
    with built(cfg, run_dir=tmp_path / "read") as loop:  # the reading run itself: no teacher actor in it
        assert loop.pipeline.teacher is None and loop.pipeline.students.size == 2
        read = loop.run()
    assert_same_training(live, read)


def test_ray_fsdp_lora_reproduces_the_local_lora_run(ray_cluster, tiny_overrides, tmp_path):
    """LoRA on 2 FSDP2 students == LoRA on one local worker over 3 steps (micro-batches of 2, so
    gradients accumulate), the same merged student and the same adapter gathered from the shards."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    lora = ["student.lora.r=4", "student.lora.alpha=8", "train.lr=1e-2", "train.micro_batch_size=2", "eval.before=false"]
    local = kdlib.run(kdlib.compose(tiny_overrides + lora + [f"output_dir={tmp_path / 'local'}"]))
    ray_run = kdlib.run(kdlib.compose(tiny_overrides + lora + RAY + [f"output_dir={tmp_path / 'ray'}"]))
    for a, b in zip(_losses(local), _losses(ray_run), strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert _losses(local)[2]["loss"] < _losses(local)[0]["loss"]
    for output, filename in (("student", "model.safetensors"), ("student_adapter", "adapter_model.safetensors")):
        a = load_file(local.outputs[output] / filename)
        b = load_file(ray_run.outputs[output] / filename)
        assert sorted(a) == sorted(b), output
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_a_served_teacher_that_dies_under_ray_stops_the_run_with_a_checkpoint(ray_cluster, tiny_overrides, tiny_llama,
                                                                              tmp_path):
    """The served teacher's failure inside a Ray actor reaches the controller as itself (not as a
    dead worker), so the run stops as it does locally: one line, the checkpoint of the last step."""
    from served_double import LoopbackServer

    from kdlib.errors import TeacherUnavailable

    with LoopbackServer(tiny_llama, die_after=4) as server:
        cfg = kdlib.compose(tiny_overrides + RAY + [
            "teacher.signal.kind=topk", "teacher.signal.k=8", "teacher/backend=served",
            f"teacher.backend.url={server.url}", "teacher.backend.token_keys=text", "teacher.backend.batch_size=4",
            "teacher.backend.retries=1", "teacher.backend.backoff_s=0.01", "train.max_steps=4",
            f"output_dir={tmp_path / 'run'}",
        ])
        with pytest.raises(TeacherUnavailable) as info:
            kdlib.run(cfg)
    message = str(info.value)
    assert "\n" not in message and message.startswith("teacher worker 0: teacher server ")
    assert f"checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_2'}" in message
    assert (tmp_path / "run" / "checkpoints" / "step_2").is_dir()
