"""kdlib's SGLang calls against the installed sglang's source (read with ast, never imported).

kdlib's teacher and rollout backends run through the engine double with a recorder in front, so
every Engine method, keyword argument, ServerArgs field and sampling parameter kdlib actually
passes is collected; each must exist in the installed ``entrypoints/engine.py``,
``server_args.py`` (whose fields live in ``arg_groups/fields/*.py``), ``managers/io_struct.py``
and ``sampling/sampling_params.py``, with a type that accepts kdlib's value. The facts about the
output layout that kdlib's conversions and docs rely on are pinned to the source lines that make
them true, so a release that changes them fails here before it is added to SUPPORTED_VERSIONS.
"""

from __future__ import annotations

import ast
import functools
from importlib import metadata
from pathlib import Path

import pytest
import torch

from engine_double import EngineDouble
from kdlib.backends.sglang.options import SGLangRolloutConfig, SGLangTeacherOptions
from kdlib.config import SignalKind, StudentConfig, TeacherConfig


@functools.lru_cache(maxsize=None)
def sglang_root() -> Path:
    try:
        return Path(metadata.distribution("sglang").locate_file("sglang"))
    except metadata.PackageNotFoundError:
        pytest.fail("sglang is not installed: `make install` installs sglang==0.5.23 with --no-deps")


@functools.lru_cache(maxsize=None)
def parsed(relative: str) -> ast.Module:
    return ast.parse((sglang_root() / relative).read_text(encoding="utf-8"))


def class_def(relative: str, name: str) -> ast.ClassDef:
    found = [n for n in ast.walk(parsed(relative)) if isinstance(n, ast.ClassDef) and n.name == name]
    assert found, f"no class {name} in sglang/{relative}"
    return found[0]


def method(relative: str, cls: str, name: str) -> ast.FunctionDef:
    found = [n for n in class_def(relative, cls).body if isinstance(n, ast.FunctionDef) and n.name == name]
    assert found, f"sglang {cls} has no method {name} (sglang/{relative})"
    return found[0]


def fields_of(cls: ast.ClassDef) -> dict[str, ast.AnnAssign]:
    return {n.target.id: n for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


@functools.lru_cache(maxsize=None)
def server_args_fields() -> dict[str, tuple[str, str]]:
    """ServerArgs field -> (type, help): the namespaces listed in server_args.py's
    _INPUT_NAMESPACES, each parsed from the arg_groups/fields module it is imported from."""
    module = parsed("srt/server_args.py")
    origin = {alias.name: node.module for node in module.body if isinstance(node, ast.ImportFrom)
              for alias in node.names}
    (listing,) = [n.value for n in module.body if isinstance(n, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == "_INPUT_NAMESPACES" for t in n.targets)]
    out = {}
    for name in [e.id for e in listing.elts]:
        relative = origin[name].removeprefix("sglang.").replace(".", "/") + ".py"
        for field, node in fields_of(class_def(relative, name)).items():
            out[field] = _type_and_help(node.annotation)
    return out


def _type_and_help(annotation: ast.expr) -> tuple[str, str]:
    """``A[T, "help"]`` or ``A[T, Arg(help=...)]`` -> (T, help)."""
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "A":
        typ, extra = annotation.slice.elts[:2]
        text = ""
        if isinstance(extra, ast.Constant):
            text = extra.value
        elif isinstance(extra, ast.Call):
            text = next((ast.literal_eval(k.value) for k in extra.keywords if k.arg == "help"
                         and isinstance(k.value, (ast.Constant, ast.BinOp)) and _literal(k.value)), "")
        return ast.unparse(typ), text
    return ast.unparse(annotation), ""


def _literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
        return True
    except ValueError:
        return False


def _accepts(annotation: str, value) -> bool:
    """Whether a field typed ``annotation`` takes kdlib's ``value``."""
    if value is None:
        return annotation.startswith("Optional[") or "None" in annotation
    names = {bool: ["bool"], int: ["int"], float: ["float"], str: ["str", "Literal"], dict: ["Dict", "dict"],
             list: ["List", "list"]}[type(value)]
    return any(n in annotation for n in names)


def signature(fn: ast.FunctionDef) -> tuple[list[str], set[str], bool]:
    positional = [a.arg for a in fn.args.posonlyargs + fn.args.args][1:]  # without self
    keywords = set(positional) | {a.arg for a in fn.args.kwonlyargs}
    return positional, keywords, fn.args.kwarg is not None


# ----------------------------------------------------------------------------------------------
# What kdlib passes: its backends run through the double with a recorder in front


class Recorder:
    """Forwards to an EngineDouble (or only records ``record_only`` methods) and logs every call."""

    record_only = {"init_weights_update_group", "update_weights_from_distributed"}

    def __init__(self, log: list, **server_args) -> None:
        log.append(("__init__", (), server_args))
        self._log = log
        self._inner = EngineDouble(**server_args)

    def __getattr__(self, name):
        target = getattr(self._inner, name)

        def call(*args, **kwargs):
            self._log.append((name, args, kwargs))
            return (True, "recorded") if name in self.record_only else target(*args, **kwargs)

        return call


@pytest.fixture(scope="module")
def kdlib_calls(tiny_llama) -> list[tuple[str, tuple, dict]]:
    """Every Engine call of a teacher and a rollout scenario with every option kdlib maps."""
    import kdlib.backends.sglang.engine
    from kdlib.batch import TokenBatch
    from kdlib.backends.sglang.rollout import SGLangRolloutBackend
    from kdlib.backends.sglang.sync import BucketMeta
    from kdlib.backends.sglang.teacher import SGLangTeacherBackend

    log: list = []
    saved = kdlib.backends.sglang.engine.SGLangEngine.factory
    kdlib.backends.sglang.engine.SGLangEngine.factory = functools.partial(Recorder, log)
    try:
        teacher = TeacherConfig(model=str(tiny_llama), backend=SGLangTeacherOptions(), revision="main")
        options = teacher.backend
        options.offload_tags = ["kv_cache", "weights", "cuda_graph"]
        options.mem_fraction_static, options.quantization, options.attention_backend = 0.5, "fp8", "triton"
        options.context_length, options.server_args = 512, {"max_running_requests": 8}
        backend = SGLangTeacherBackend(teacher, torch.device("cuda", 1))
        ids = torch.tensor([[3, 4, 5, 6, 7]])
        backend.score(TokenBatch(ids, torch.ones_like(ids), torch.tensor([[False, True, True, True, False]])))
        backend.sleep()
        backend.wake()
        topk = TeacherConfig(model=str(tiny_llama), backend=SGLangTeacherOptions(), revision="main")
        topk.signal.kind, topk.signal.k = SignalKind.topk, 2  # the engine's own top-k is the signal
        SGLangTeacherBackend(topk, torch.device("cuda", 1)).score(
            TokenBatch(ids, torch.ones_like(ids), torch.tensor([[False, True, True, True, False]])))

        rollout = SGLangRolloutConfig(max_new_tokens=3, n_samples_per_prompt=2)
        rollout.deterministic = rollout.release_memory = True
        engine = SGLangRolloutBackend(StudentConfig(model=str(tiny_llama)), torch.device("cpu"), rollout)
        engine.generate([[3, 4, 5]], stop_ids={2}, pad_id=0, seed=1)
        engine.load_weights({"lm_head.weight": torch.zeros(384, 64)})
        engine.join_weight_group("127.0.0.1", 5000, 1, 2, "kdlib_weight_sync", "nccl")
        engine.receive_weights([BucketMeta(["model.norm.weight"], ["float32"], [[64]])], "kdlib_weight_sync")
        engine.generate([[3, 4, 5]], stop_ids={2}, pad_id=0, seed=1)
        kdlib.backends.sglang.engine.SGLangEngine({"model_path": str(tiny_llama), "dtype": "float32"}, "x").shutdown()
    finally:
        kdlib.backends.sglang.engine.SGLangEngine.factory = saved
    return log


# ----------------------------------------------------------------------------------------------
# The checks


def test_the_installed_sglang_is_a_supported_version():
    from kdlib.backends.sglang.engine import SUPPORTED_VERSIONS, installed_version

    assert installed_version() in SUPPORTED_VERSIONS


def test_every_server_args_field_exists_with_a_compatible_type(kdlib_calls):
    fields = server_args_fields()
    assert len(fields) > 300 and "model_path" in fields  # the parser found the namespaces
    passed = {}
    for name, _, kwargs in kdlib_calls:
        if name == "__init__":
            passed.update(kwargs)
    expected = {"model_path", "dtype", "tp_size", "device", "base_gpu_id", "revision", "random_seed", "log_level",
                "skip_tokenizer_init", "enable_return_hidden_states", "disable_radix_cache", "chunked_prefill_size",
                "enable_memory_saver", "enable_weights_cpu_backup", "enable_deterministic_inference",
                "mem_fraction_static", "quantization", "attention_backend", "context_length", "trust_remote_code",
                "max_running_requests"}
    assert expected <= set(passed)
    for key, value in passed.items():
        assert key in fields, f"ServerArgs has no field {key!r}"
        assert _accepts(fields[key][0], value), f"ServerArgs.{key}: {fields[key][0]} does not take {value!r}"


def test_server_args_mean_what_kdlib_assumes():
    fields = server_args_fields()
    assert "-1 means disabling chunked prefill" in fields["chunked_prefill_size"][1]
    assert "full hidden states" in fields["enable_return_hidden_states"][1]
    assert "CPU memory" in fields["enable_weights_cpu_backup"][1]
    assert "release_memory_occupation" in fields["enable_memory_saver"][1]
    assert "RadixAttention" in fields["disable_radix_cache"][1]
    assert "bfloat16" in fields["dtype"][1] and "float32" in fields["dtype"][1]
    choices = ast.literal_eval(next(n.value for n in parsed("srt/arg_groups/choices.py").body
                                    if isinstance(n, ast.Assign) and n.targets[0].id == "QUANTIZATION_CHOICES"))
    assert "fp8" in choices  # the FP8 teacher of KDFlow's table


def test_every_engine_method_and_keyword_exists(kdlib_calls):
    called = {(name, len(args), frozenset(kwargs)) for name, args, kwargs in kdlib_calls if name != "__init__"}
    assert {name for name, _, _ in called} == {
        "generate", "release_memory_occupation", "resume_memory_occupation", "flush_cache", "begin_weight_update",
        "end_weight_update", "update_weights_from_tensor", "init_weights_update_group",
        "update_weights_from_distributed", "shutdown",
    }
    for name, n_args, kwargs in called:
        positional, keywords, open_kwargs = signature(method("srt/entrypoints/engine.py", "Engine", name))
        assert n_args <= len(positional), f"Engine.{name} takes {len(positional)} positional arguments, kdlib passes {n_args}"
        unknown = set(kwargs) - keywords
        assert open_kwargs or not unknown, f"Engine.{name} has no parameter(s) {sorted(unknown)}"


def test_generate_requests_and_sampling_params_exist(kdlib_calls):
    request_fields = set(fields_of(class_def("srt/managers/io_struct.py", "GenerateReqInput")))
    sampling_fields = set(fields_of(class_def("srt/sampling/sampling_params.py", "SamplingParams")))
    requests, sampling = set(), set()
    for name, _, kwargs in kdlib_calls:
        if name == "generate":
            requests |= set(kwargs)
            params = kwargs["sampling_params"]
            for p in params if isinstance(params, list) else [params]:
                sampling |= set(p)
    assert {"return_hidden_states", "return_logprob", "logprob_start_len", "top_logprobs_num",
            "token_ids_logprob"} <= requests
    assert requests - {"sampling_params"} <= request_fields, sorted(requests - request_fields)
    assert {"max_new_tokens", "temperature", "top_p", "stop_token_ids", "no_stop_trim", "sampling_seed"} <= sampling
    assert sampling <= sampling_fields, sorted(sampling - sampling_fields)


def test_memory_tags_are_sglangs():
    from kdlib.backends.sglang.options import MEMORY_TAGS as SGLANG_MEMORY_TAGS

    values = {n.targets[0].id: n.value.value for n in parsed("srt/constants.py").body
              if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)}
    assert {v for k, v in values.items() if k.startswith("GPU_MEMORY_TYPE_")} == set(SGLANG_MEMORY_TAGS)


def _source(relative: str, cls: str, name: str) -> str:
    return ast.unparse(method(relative, cls, name))


def test_output_layout_kdlib_reads_is_the_sources():
    results = "srt/managers/scheduler_components/batch_result_processor.py"
    processor = "SchedulerBatchResultProcessor"
    prefill = _source(results, processor, "_append_prefill_hidden_states")
    # the prefill appends one element holding the rows of every position it computed
    assert "req.hidden_states.append(req_hidden_states.cpu().clone().tolist())" in prefill
    assert "hidden_state_offset += extend_input_len" in prefill
    assert "req.hidden_states.extend(" in _source(results, processor, "_append_decode_hidden_states")
    # middle chunks of a chunked prefill are not stored
    batch = _source(results, processor, "process_batch_result_prefill")
    assert "req.inflight_middle_chunks <= 0" in batch and "store=should_commit_output" in batch
    # the returned list is cut to the number of output tokens (0 for max_new_tokens=0)
    streamer = ast.unparse(parsed("srt/managers/scheduler_components/output_streamer.py"))
    assert "hs = hs[:req.finished_len]" in streamer
    # input log-probs: entry t is for token t, entry 0 is None
    logprobs = ast.unparse(parsed("srt/managers/scheduler_components/logprob_result_processor.py"))
    assert "[None] + input_token_logprobs[:-1]" in logprobs
    # meta_info carries the per-request hidden states
    assert "meta_info['hidden_states'] = hidden_states" in ast.unparse(parsed("srt/managers/tokenizer_manager.py"))


def test_the_supported_architectures_hand_post_norm_states_to_the_logits_processor():
    processor = next(ast.unparse(n) for n in ast.walk(parsed("srt/layers/logits_processor.py"))
                     if isinstance(n, ast.FunctionDef) and n.name == "_get_hidden_states_to_store")
    assert "hidden_states_to_store = hidden_states_to_store_before_norm" in processor  # pre-norm wins if given
    for model in ("qwen3", "qwen3_moe", "qwen2", "qwen2_moe", "llama"):
        text = (sglang_root() / "srt" / "models" / f"{model}.py").read_text(encoding="utf-8")
        assert "hidden_states_before_norm" not in text, model
        assert "final_norm(" in text or "self.norm(" in text, model


def test_weight_updates_need_a_session_and_release_needs_an_idle_engine():
    updater = "srt/managers/scheduler_components/weight_updater.py"
    cls = "SchedulerWeightUpdaterManager"
    for name in ("update_weights_from_tensor", "update_weights_from_distributed"):
        assert "must run between begin_weight_update() and end_weight_update()" in _source(updater, cls, name)
        assert "flush_cache_after_weight_update" in _source(updater, cls, name)
    assert "is_fully_idle" in _source(updater, cls, "release_memory_occupation")
    assert "self.offload_tags.remove(tag)" in _source(updater, cls, "resume_memory_occupation")
