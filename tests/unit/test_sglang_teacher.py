"""The SGLang teacher backend through the engine double (tests/engine_double.py): positions,
batching, the head self-check, release/resume, and equality with the transformers teacher."""

from __future__ import annotations

import pytest
import torch

from kdlib.backends.sglang.options import SGLangTeacherOptions

from engine_double import EngineDouble
from token_batches import packed, padded_batch
from kdlib.config import Precision, SignalKind, TeacherConfig
from kdlib.errors import ModelError


@pytest.fixture
def double(monkeypatch):
    """Every SGLang engine kdlib starts is an EngineDouble."""
    import kdlib.backends.sglang.engine

    monkeypatch.setattr(kdlib.backends.sglang.engine.SGLangEngine, "factory", EngineDouble)
    monkeypatch.setattr(EngineDouble, "instances", [])
    return EngineDouble


def _teacher_cfg(path, dtype=Precision.float32, tags=(), **options) -> TeacherConfig:
    cfg = TeacherConfig(model=str(path), backend=SGLangTeacherOptions(offload_tags=list(tags)), dtype=dtype)
    for key, value in options.items():
        setattr(cfg.backend, key, value)
    return cfg


def test_samples_are_split_in_loss_row_order():
    from kdlib.batch import split_samples

    batch = padded_batch()
    for view in (batch, packed(batch)):
        samples = split_samples(view)
        assert [len(s.input_ids) for s in samples] == [12, 7, 10]
        assert [s.loss_positions.tolist() for s in samples] == [list(range(4, 11)), list(range(2, 6)), list(range(0, 9))]
        assert samples[1].input_ids == batch.input_ids[1, :7].tolist()


@pytest.mark.parametrize("dtype", [Precision.float32, Precision.bfloat16])
def test_hidden_rows_equal_the_transformers_teacher(double, tiny_llama, dtype):
    """The rows at the loss positions, padded and packed, are the hf backend's rows."""
    from kdlib.backends.hf.teacher import HFTeacherBackend
    from kdlib.backends.sglang.teacher import SGLangTeacherBackend

    cfg = _teacher_cfg(tiny_llama, dtype)
    sglang = SGLangTeacherBackend(cfg, torch.device("cpu"))
    hf = HFTeacherBackend(cfg, torch.device("cpu"))
    batch = padded_batch()
    expected = hf.score(batch).hidden.float()
    assert expected.shape == (batch.n_loss_tokens, 64) and expected.abs().sum() > 0
    tolerance = {Precision.float32: 1e-5, Precision.bfloat16: 0.05}[dtype]
    for view in (batch, packed(batch)):
        got = sglang.score(view).hidden
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    # one generate call per micro-batch, every sample scored with one new token
    (engine,) = double.instances
    assert [n for name, n in engine.calls_named("generate")][1:] == [3, 3]


def test_engine_runs_with_hidden_states_on_and_prefix_reuse_off(double, tiny_llama):
    from kdlib.backends.sglang.teacher import SGLangTeacherBackend

    SGLangTeacherBackend(_teacher_cfg(tiny_llama, tags=["kv_cache", "weights"], tp_size=2,
                                      mem_fraction_static=0.4, quantization="fp8"), torch.device("cpu"))
    args = double.instances[0].server_args
    assert args["enable_return_hidden_states"] is True
    assert args["disable_radix_cache"] is True and args["chunked_prefill_size"] == -1
    assert args["enable_memory_saver"] is True and args["enable_weights_cpu_backup"] is True
    assert (args["tp_size"], args["mem_fraction_static"], args["quantization"]) == (2, 0.4, "fp8")
    assert args["skip_tokenizer_init"] is True and args["dtype"] == "float32"


def test_a_prefix_cache_hit_or_a_chunked_prefill_is_refused(double, tiny_llama):
    """With SGLang's defaults some prompt positions get no hidden state: kdlib must notice."""
    from kdlib.backends.sglang.engine import SGLangEngine
    from kdlib.backends.sglang.teacher import SCORING
    from kdlib.backends.sglang.outputs import prefill_hidden

    engine = SGLangEngine({"model_path": str(tiny_llama), "dtype": "float32", "enable_return_hidden_states": True,
                           "chunked_prefill_size": -1}, "teacher")
    prompt = list(range(1, 13))
    first, second = engine.generate([prompt, prompt[:8] + [99, 98]], SCORING, return_hidden_states=True)
    assert prefill_hidden(first, 12, range(12), "teacher").shape == (12, 64)
    with pytest.raises(ModelError, match=r"shape \(2, 64\) for a prompt of 10 tokens.*radix cache"):
        prefill_hidden(second, 10, [3], "teacher")  # the shared 8-token prefix came from the radix cache

    chunked = SGLangEngine({"model_path": str(tiny_llama), "dtype": "float32", "enable_return_hidden_states": True,
                            "disable_radix_cache": True}, "teacher")
    (long,) = chunked.generate([list(range(1, 41))], SCORING, return_hidden_states=True)
    with pytest.raises(ModelError, match="chunked prefill"):
        prefill_hidden(long, 40, [3], "teacher")
    (nothing,) = chunked.generate([prompt], {"max_new_tokens": 0}, return_hidden_states=True)
    with pytest.raises(ModelError, match="no hidden states"):
        prefill_hidden(nothing, 12, [3], "teacher")


@pytest.mark.parametrize("tail_mass", [True, False])
def test_topk_signal_is_the_engines_logprobs_at_each_loss_row(double, tiny_llama, tail_mass):
    """teacher.signal=topk: the engine's own prompt top-k log-probabilities at the loss rows (no
    hidden states, no head, no self-check), the tail mass what they leave of the vocabulary."""
    from kdlib.models.checkpoint_head import load_lm_head
    from kdlib.backends.sglang.teacher import SGLangTeacherBackend

    cfg = _teacher_cfg(tiny_llama)
    batch = padded_batch()
    hidden = SGLangTeacherBackend(cfg, torch.device("cpu")).score(batch).hidden
    cfg.signal.kind, cfg.signal.k, cfg.signal.tail_mass = SignalKind.topk, 4, tail_mass
    backend = SGLangTeacherBackend(cfg, torch.device("cpu"))
    assert backend.head_check is None and not double.instances[-1].server_args["enable_return_hidden_states"]
    with pytest.raises(ModelError, match="loads no head"):
        backend.lm_head()
    out = backend.score(batch)
    assert out.signal == "topk" and out.topk_ids.dtype == torch.uint16  # a 384-token vocabulary
    assert out.topk_ids.shape == out.topk_logprobs.shape == (batch.n_loss_tokens, 4)
    full = torch.log_softmax(load_lm_head(cfg).logits(hidden).double(), dim=-1)
    reference = full.topk(4)
    assert torch.equal(out.topk_ids.long(), reference.indices)
    torch.testing.assert_close(out.topk_logprobs.double(), reference.values, atol=1e-5, rtol=1e-5)
    if tail_mass:
        tail = torch.logsumexp(full.scatter(-1, reference.indices, float("-inf")), -1)
        torch.testing.assert_close(out.topk_tail.double(), tail, atol=1e-4, rtol=1e-4)
    else:
        assert out.topk_tail is None


@pytest.mark.parametrize("dtype", [Precision.float32, Precision.bfloat16])
def test_head_self_check_passes_for_the_checkpoints_head(double, tiny_llama, tiny_qwen3, dtype):
    from kdlib.backends.sglang.teacher import SGLangTeacherBackend

    backend = SGLangTeacherBackend(_teacher_cfg(tiny_llama, dtype), torch.device("cpu"))
    check = backend.head_check
    assert check.positions == 23 and check.token_ids > 32
    assert check.max_error <= check.tolerance
    # and the tied-embedding architecture reads its head from the embedding
    SGLangTeacherBackend(_teacher_cfg(tiny_qwen3, dtype), torch.device("cpu"))


def test_head_self_check_fails_for_a_wrong_head(double, tiny_llama, tiny_qwen3):
    from dataclasses import replace

    from kdlib.config import ModelConfig
    from kdlib.models.checkpoint_head import load_lm_head
    from kdlib.backends.sglang.engine import SGLangEngine
    from kdlib.backends.sglang.teacher import check_head

    engine = SGLangEngine({"model_path": str(tiny_llama), "dtype": "float32", "enable_return_hidden_states": True,
                           "disable_radix_cache": True, "chunked_prefill_size": -1}, "teacher")
    right = load_lm_head(ModelConfig(model=str(tiny_llama)))
    assert check_head(engine, right).max_error == 0.0
    other_model = load_lm_head(ModelConfig(model=str(tiny_qwen3)))  # same shape, another checkpoint
    scaled = replace(right, logit_scale=1.1)  # an output transform the engine does not apply
    for wrong in (other_model, scaled):
        with pytest.raises(ModelError, match="head self-check failed"):
            check_head(engine, wrong)


def test_an_engine_returning_pre_norm_states_stops_the_start(double, tiny_llama, monkeypatch):
    from kdlib.backends.sglang.teacher import SGLangTeacherBackend

    monkeypatch.setattr(EngineDouble, "prenorm", True)
    with pytest.raises(ModelError, match="not the post-norm input"):
        SGLangTeacherBackend(_teacher_cfg(tiny_llama), torch.device("cpu"))
    assert double.instances[0].calls[-1][0] == "shutdown"


def test_sleep_and_wake_release_and_resume_the_configured_tags(double, tiny_llama):
    from kdlib.backends.sglang.teacher import SGLangTeacherBackend

    backend = SGLangTeacherBackend(_teacher_cfg(tiny_llama, tags=["kv_cache", "weights", "cuda_graph"]),
                                   torch.device("cpu"))
    engine = double.instances[0]
    batch = padded_batch()
    before = backend.score(batch).hidden
    backend.wake()  # awake already: nothing to resume (SGLang raises on a tag it did not release)
    backend.sleep()
    backend.sleep()
    backend.wake()
    tags = ["kv_cache", "weights", "cuda_graph"]
    assert engine.calls_named("release_memory_occupation", "resume_memory_occupation") == [
        ("release_memory_occupation", tags), ("resume_memory_occupation", tags)]
    assert torch.equal(backend.score(batch).hidden, before)  # the CPU backup kept the weights


def test_releasing_weights_without_a_backup_is_refused_and_would_lose_them(double, tiny_llama):
    import kdlib
    from kdlib.errors import ConfigError

    with pytest.raises(ConfigError, match="weights_cpu_backup=false"):
        kdlib.compose([f"teacher.model={tiny_llama}", f"student.model={tiny_llama}", "teacher/backend=sglang",
                       "teacher.backend.offload_tags=[weights]", "teacher.backend.weights_cpu_backup=false",
                       "device=cpu"])
    # what the check prevents: the engine comes back with other weights
    from kdlib.backends.sglang.engine import SGLangEngine
    from kdlib.backends.sglang.teacher import SCORING

    engine = SGLangEngine({"model_path": str(tiny_llama), "dtype": "float32", "enable_return_hidden_states": True,
                           "enable_memory_saver": True}, "teacher")
    (before,) = engine.generate([[5, 6, 7]], SCORING, return_hidden_states=True)
    engine.release(["weights"])
    engine.resume(["weights"])
    (after,) = engine.generate([[5, 6, 7]], SCORING, return_hidden_states=True)
    assert after["meta_info"]["hidden_states"] != before["meta_info"]["hidden_states"]


def test_offload_tags_follow_colocation_and_sglang_options_are_checked(tiny_llama):
    import kdlib
    from kdlib.errors import ConfigError

    base = [f"teacher.model={tiny_llama}", f"student.model={tiny_llama}", "teacher/backend=sglang", "device=cpu"]
    assert kdlib.compose(base).teacher.backend.offload_tags == []
    colocated = kdlib.compose(base + ["pipeline.colocate=true"])
    assert colocated.teacher.backend.offload_tags == ["kv_cache", "weights", "cuda_graph"]
    assert "teacher.backend.offload_tags" in colocated.auto_choices
    bad = {
        "teacher.backend.tp_size=0": "teacher.backend.tp_size",
        "teacher.backend.mem_fraction_static=1.5": "mem_fraction_static",
        "teacher.backend.offload_tags=[vram]": "unknown",
        "+teacher.backend.server_args.disable_radix_cache=false": r"\['disable_radix_cache'\] are set by kdlib",
        "teacher.from_student=true": "loads weights",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            kdlib.compose(base + [override])


def test_unsupported_or_missing_sglang_is_a_clear_error(monkeypatch):
    from importlib import metadata

    import kdlib.backends.sglang.engine as engine

    assert engine.check_version() in engine.SUPPORTED_VERSIONS  # the installed, contract-tested one
    monkeypatch.setattr(engine.metadata, "version", lambda name: "0.4.9")
    with pytest.raises(ModelError, match=r"sglang 0\.4\.9 is installed; kdlib supports sglang 0\.5\.23"):
        engine.SGLangEngine({}, "teacher")

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(engine.metadata, "version", missing)
    with pytest.raises(ModelError, match=r"pip install 'kdlib\[sglang\]'"):
        engine.check_version()
