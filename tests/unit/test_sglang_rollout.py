"""The SGLang rollout backend through the engine double: sampling, finish reasons, the order of a
weight sync (session, buckets, flush, release/resume), stale-weight refusal, the broadcast path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine_double import EngineDouble
from kdlib.backends.hf.options import HFRolloutConfig
from kdlib.backends.sglang.options import SGLangRolloutConfig
from kdlib.config import StudentConfig
from kdlib.errors import ModelError
from kdlib.backends.base import Generation

TAGS = ["kv_cache", "weights", "cuda_graph"]


@pytest.fixture
def double(monkeypatch):
    import kdlib.backends.sglang.engine

    monkeypatch.setattr(kdlib.backends.sglang.engine.SGLangEngine, "factory", EngineDouble)
    monkeypatch.setattr(EngineDouble, "instances", [])
    return EngineDouble


def _backend(path, **options):
    from kdlib.backends.sglang.rollout import SGLangRolloutBackend

    cfg = SGLangRolloutConfig(max_new_tokens=6, temperature=0.0)
    for key, value in options.items():
        setattr(cfg, key, value)
    return SGLangRolloutBackend(StudentConfig(model=str(path)), torch.device("cpu"), cfg), cfg


def _student_state(path, seed: int) -> dict[str, torch.Tensor]:
    """Weights of the same architecture that differ from the checkpoint's (a trained student)."""
    from kdlib.models.loading import load_causal_lm

    model = load_causal_lm(StudentConfig(model=str(path)), device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    return {k: v.detach() + 0.01 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def _buckets(state, n):
    names = list(state)
    size = -(-len(names) // n)
    return [{k: state[k] for k in names[i : i + size]} for i in range(0, len(names), size)]


PROMPTS = [[1, 20, 31, 44, 5], [7, 8, 9], [100, 3, 250, 12]]


def test_finish_reasons_and_stop_tokens():
    from kdlib.backends.sglang.rollout import parse_generation

    def out(ids, reason):
        return {"output_ids": ids, "meta_info": {"finish_reason": reason}}

    stop = {2}
    assert parse_generation(out([5, 6, 2], {"type": "stop", "matched": 2}), stop, 8) == Generation([5, 6, 2], "stop")
    assert parse_generation(out([5, 6, 7], {"type": "length", "length": 3}), stop, 3) == Generation([5, 6, 7], "length")
    # the model's own EOS (not an end-of-turn id) also ends a response
    assert parse_generation(out([5, 9], {"type": "stop", "matched": 9}), stop, 8) == Generation([5, 9], "stop")
    with pytest.raises(ModelError, match="length finish after 2 of 8"):
        parse_generation(out([5, 6], {"type": "length", "length": 8}), stop, 8)


def test_greedy_samples_equal_the_transformers_rollout(double, tiny_llama):
    """n samples per prompt, in prompt order, each through its end token: as rollout=hf."""
    from kdlib.backends.hf.rollout import HFRolloutBackend

    backend, cfg = _backend(tiny_llama)
    cfg.n_samples_per_prompt = 2
    hf_cfg = HFRolloutConfig(max_new_tokens=6, temperature=0.0, n_samples_per_prompt=2)
    hf = HFRolloutBackend(StudentConfig(model=str(tiny_llama)), torch.device("cpu"), hf_cfg)
    stop = {EngineDouble(model_path=str(tiny_llama), dtype="float32").model.config.eos_token_id, 300}
    got = backend.generate(PROMPTS, stop_ids=stop, pad_id=0, seed=1)
    expected = hf.generate(PROMPTS, stop_ids=stop, pad_id=0, seed=1)
    assert got == expected
    assert [len(g) for g in got] == [2, 2, 2]
    params = double.instances[0].server_args
    assert params["enable_memory_saver"] is False and params["skip_tokenizer_init"] is True


def test_sampling_options_reach_the_engine(double, tiny_llama):
    backend, cfg = _backend(tiny_llama, deterministic=True)
    cfg.temperature, cfg.top_p, cfg.n_samples_per_prompt = 0.8, 0.9, 3
    engine = double.instances[0]
    seen = []
    original = engine.generate
    engine.generate = lambda input_ids, sampling_params, **kw: seen.append(sampling_params) or original(
        input_ids, sampling_params, **kw)
    first = backend.generate(PROMPTS[:2], stop_ids={300}, pad_id=0, seed=40)
    second = backend.generate(PROMPTS[:2], stop_ids={300}, pad_id=0, seed=40)
    assert first == second  # each sample seeded: the same seed samples the same responses
    (params, _) = seen
    assert [p["sampling_seed"] for p in params] == list(range(40, 46))
    assert all(p["temperature"] == 0.8 and p["top_p"] == 0.9 and p["max_new_tokens"] == 6 for p in params)
    assert params[0]["stop_token_ids"] == [300] and params[0]["no_stop_trim"] is True
    assert engine.server_args["enable_deterministic_inference"] is True


def test_weight_sync_is_one_session_then_one_flush_before_generating(double, tiny_llama):
    backend, cfg = _backend(tiny_llama)
    engine = double.instances[0]
    state = _student_state(tiny_llama, seed=1)
    for bucket in _buckets(state, 3):
        backend.load_weights(bucket)
    assert engine.session  # closed only when the whole update is in
    backend.generate(PROMPTS, stop_ids={300}, pad_id=0, seed=0)
    calls = [name for name, _ in engine.calls]
    assert calls == ["begin_weight_update"] + ["update_weights_from_tensor"] * 3 + [
        "end_weight_update", "flush_cache", "generate"]
    assert all(flush is False for _, (_, flush) in engine.calls_named("update_weights_from_tensor"))
    synced = {n for _, (names, _) in engine.calls_named("update_weights_from_tensor") for n in names}
    assert synced == set(state)
    for name, value in engine.model.state_dict().items():  # bit for bit
        assert torch.equal(value, state[name]), name
    # no new weights: no session, no flush
    backend.generate(PROMPTS, stop_ids={300}, pad_id=0, seed=0)
    assert [name for name, _ in engine.calls][-1:] == ["generate"]


def test_released_engine_resumes_weights_to_load_and_the_rest_to_generate(double, tiny_llama):
    backend, cfg = _backend(tiny_llama, release_memory=True)
    engine = double.instances[0]
    assert engine.server_args["enable_memory_saver"] is True
    backend.generate(PROMPTS, stop_ids={300}, pad_id=0, seed=0)
    state = _student_state(tiny_llama, seed=2)
    for bucket in _buckets(state, 2):
        backend.load_weights(bucket)
    out = backend.generate(PROMPTS, stop_ids={300}, pad_id=0, seed=0)
    calls = [(name, arg if "memory" in name else None) for name, arg in engine.calls]
    assert calls == [
        ("generate", None), ("release_memory_occupation", TAGS),
        ("resume_memory_occupation", ["weights"]), ("begin_weight_update", None),
        ("update_weights_from_tensor", None), ("update_weights_from_tensor", None),
        ("end_weight_update", None), ("resume_memory_occupation", ["kv_cache", "cuda_graph"]),
        ("flush_cache", None), ("generate", None), ("release_memory_occupation", TAGS),
    ]
    for name, value in engine.model.state_dict().items():
        assert torch.equal(value, state[name]), name
    # the samples are the synced student's (the released weights came back as garbage)
    fresh, _ = _backend(tiny_llama)
    for bucket in _buckets(state, 1):
        fresh.load_weights(bucket)
    assert fresh.generate(PROMPTS, stop_ids={300}, pad_id=0, seed=0) == out


def test_stale_weights_after_a_release_are_refused(double, tiny_llama):
    backend, cfg = _backend(tiny_llama, release_memory=True)
    state = _student_state(tiny_llama, seed=3)
    buckets = _buckets(state, 3)
    for bucket in buckets:
        backend.load_weights(bucket)
    backend.generate(PROMPTS, stop_ids={300}, pad_id=0, seed=0)  # releases everything after
    backend.load_weights(buckets[0])  # one bucket of three
    with pytest.raises(ModelError, match=r"released its weights and \d+ tensors .* were not loaded again"):
        backend.generate(PROMPTS, stop_ids={300}, pad_id=0, seed=0)
    for bucket in buckets[1:]:
        backend.load_weights(bucket)
    backend.generate(PROMPTS, stop_ids={300}, pad_id=0, seed=0)


def test_an_update_outside_a_session_fails_with_sglangs_message(double, tiny_llama):
    from kdlib.backends.sglang.engine import SGLangEngine

    engine = SGLangEngine({"model_path": str(tiny_llama), "dtype": "float32"}, "rollout")
    with pytest.raises(ModelError, match="rollout: SGLang update_weights_from_tensor failed: .*begin_weight_update"):
        engine.update_weights_from_tensor([("lm_head.weight", torch.zeros(1))])


def test_a_pruned_student_is_written_once_for_the_engine(double, tiny_llama, tmp_path, monkeypatch):
    from kdlib.models.student import build_model
    from kdlib.backends.sglang.rollout import engine_checkpoint

    monkeypatch.setenv("KDLIB_CACHE", str(tmp_path))
    student = StudentConfig(model=str(tiny_llama), num_layers=2)
    path = engine_checkpoint(student)
    assert path.startswith(str(tmp_path)) and engine_checkpoint(student) == path
    assert engine_checkpoint(StudentConfig(model=str(tiny_llama))) == str(tiny_llama)
    engine = EngineDouble(model_path=path, dtype="float32")
    assert engine.model.config.num_hidden_layers == 2
    expected = build_model(student, torch.device("cpu")).state_dict()
    for name, value in engine.model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def _broadcast_sender(port, state, plan, world):
    from kdlib.backends.sglang.sync import broadcast_state, open_sender_group

    group = open_sender_group("127.0.0.1", port, world, "kdlib_weight_sync", "gloo", timeout_s=60)
    broadcast_state(group, state, plan, torch.device("cpu"))
    torch.distributed.destroy_process_group(group)


def test_broadcast_sync_over_gloo_reaches_the_engine_bit_for_bit(double, tiny_llama):
    """Student rank 0 (another process) broadcasts; the engine joins SGLang's way and loads."""
    import multiprocessing

    from kdlib.parallel.distributed import free_port
    from kdlib.backends.sglang.sync import bucket_plan

    backend, cfg = _backend(tiny_llama)
    engine = double.instances[0]
    state = _student_state(tiny_llama, seed=4)
    plan = bucket_plan(state, bucket_bytes=40_000)
    assert len(plan) > 2 and [n for b in plan for n in b.names] == list(state)
    port = free_port()
    sender = multiprocessing.get_context("spawn").Process(target=_broadcast_sender, args=(port, state, plan, 2))
    sender.start()
    try:
        backend.join_weight_group("127.0.0.1", port, 1, 2, "kdlib_weight_sync", "gloo")
        backend.receive_weights(plan, "kdlib_weight_sync")
    finally:
        sender.join(timeout=60)
        for group in engine.groups.values():
            torch.distributed.destroy_process_group(group)
    assert sender.exitcode == 0
    backend.generate(PROMPTS, stop_ids={300}, pad_id=0, seed=0)
    calls = [name for name, _ in engine.calls]
    assert calls == ["init_weights_update_group", "begin_weight_update"] + ["update_weights_from_distributed"] * len(
        plan) + ["end_weight_update", "flush_cache", "generate"]
    for name, value in engine.model.state_dict().items():
        assert torch.equal(value, state[name]), name


class _RecordingGroup:
    """A worker group stand-in recording which calls were in flight together."""

    def __init__(self, role, size, log, results):
        self.role, self.size, self.log, self.results = role, size, log, results

    def call(self, fn, *args):
        self.log.append(("call", self.role, fn.__name__))
        return [self.results.get(fn.__name__)] * self.size

    def submit_each(self, fn, args_per_worker):
        self.log.append(("submit", self.role, fn.__name__, [tuple(a) for a in args_per_worker]))
        return [self.results.get(fn.__name__)] * self.size

    def gather(self, futures, fn):
        self.log.append(("gather", self.role, fn.__name__))
        return futures


def test_distributed_sync_submits_both_sides_before_waiting():
    from kdlib.backends.sglang.sync import GROUP_NAME, BucketMeta, DistributedWeightSync

    log = []
    plan = [BucketMeta(["w"], ["float32"], [[2]])]
    student = SimpleNamespace(group=_RecordingGroup("student", 2, log, {"sender_address": ("10.0.0.1", 5000),
                                                                          "open_sender": plan}))
    rollout = SimpleNamespace(group=_RecordingGroup("rollout", 2, log, {}))
    cfg = SimpleNamespace(onpolicy=SimpleNamespace(sync_bucket_mb=1), rollout=SimpleNamespace(tp_size=2), device="cuda")
    sync = DistributedWeightSync(student, rollout, cfg)
    sync.sync()
    sync.sync()
    address = ("10.0.0.1", 5000)
    assert log == [
        ("call", "student", "sender_address"),
        ("submit", "student", "open_sender", [(*address, 5, GROUP_NAME, "nccl", 2**20)] * 2),
        ("submit", "rollout", "join_group", [(*address, 1, 5, GROUP_NAME, "nccl"), (*address, 3, 5, GROUP_NAME, "nccl")]),
        ("gather", "rollout", "join_group"), ("gather", "student", "open_sender"),
    ] + [
        ("submit", "student", "send_weights", [(), ()]),
        ("submit", "rollout", "receive_weights", [(plan, GROUP_NAME)] * 2),
        ("gather", "student", "send_weights"), ("gather", "rollout", "receive_weights"),
    ] * 2


def test_distributed_sync_needs_the_ray_launcher(tiny_llama):
    import kdlib
    from kdlib.errors import ConfigError

    with pytest.raises(ConfigError, match="weight_sync=distributed needs launcher=ray"):
        kdlib.compose([f"teacher.model={tiny_llama}", f"student.model={tiny_llama}", "+recipe=onpolicy",
                       "rollout=sglang", "rollout.weight_sync=distributed", "device=cpu"])
