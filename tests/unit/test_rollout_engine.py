"""The rollout engine samples what plain ``generate`` samples, follows synced weights, falls back.

Tiny random Llama (untied head) and Qwen3 (tied embeddings) students; prompts of different
lengths, so batches are left-padded; ``n_samples_per_prompt=2`` with ``batch_size=3``, so a call
runs several batches, the last one smaller. The compiled and frozen engines' tests are marked
``slow`` (torch.compile takes tens of seconds on two cores); what a weight load does to each
engine is also checked fast, with torch.compile replaced by a recorder.
"""

from __future__ import annotations

import logging

import pytest
import torch

from kdlib.backends.hf.options import HFRolloutConfig as RolloutConfig, RolloutEngine
from kdlib.config.schema import StudentConfig
from kdlib.backends.hf.rollout import HFRolloutBackend, generate_kwargs, left_pad

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20, 21] * 6, [30, 31, 32, 33, 34]]
SAMPLING = {"greedy": (0.0, 1.0), "sampling": (1.0, 1.0), "top_p": (0.8, 0.7)}
PAD = 0


def _backend(path, **model) -> HFRolloutBackend:
    return HFRolloutBackend(StudentConfig(model=str(path), **model), torch.device("cpu"), RolloutConfig())


def _cfg(engine, sampling="sampling", **kw) -> RolloutConfig:
    temperature, top_p = SAMPLING[sampling]
    base = dict(max_new_tokens=16, batch_size=3, n_samples_per_prompt=2)
    return RolloutConfig(engine=RolloutEngine(engine), temperature=temperature, top_p=top_p, **{**base, **kw})


def _generate(backend, cfg, stop_ids=frozenset({1}), seed=11):
    backend.cfg = cfg  # one backend (and its built engines) decodes under each configuration
    return backend.generate(PROMPTS, stop_ids=set(stop_ids), pad_id=PAD, seed=seed)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return _backend(tiny_llama)


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3):
    return _backend(tiny_qwen3)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("sampling", sorted(SAMPLING))
def test_engine_samples_the_same_tokens_as_generate(arch, sampling, request):
    backend = request.getfixturevalue(arch)
    plain = _generate(backend, _cfg("generate", sampling))
    engine = _generate(backend, _cfg("auto", sampling))
    assert backend.engine(RolloutEngine.auto) is not None  # the engine ran, not the fallback
    assert [len(per_prompt) for per_prompt in engine] == [2] * len(PROMPTS)
    assert engine == plain
    if sampling != "greedy":  # the seed matters: another seed samples something else
        assert _generate(backend, _cfg("auto", sampling), seed=12) != engine
    else:  # two greedy samples of one prompt are the same response
        assert all(a == b for a, b in engine)


@pytest.mark.parametrize("sampler", ["multinomial", "inverse_cdf"])
@pytest.mark.parametrize("sampling", ["sampling", "top_p"])
def test_sampled_logprobs_are_the_students_own(llama, sampling, sampler):
    """The log-probability the engine drew each token with equals the student's full forward's
    (the check that stays valid where compile or the head product reorder float32 sums)."""
    _check_logprobs(llama, llama.engine(RolloutEngine.static), sampling, sampler)


def test_inverse_cdf_draws_the_distribution():
    from kdlib.backends.hf.decode.sampling import inverse_cdf_draw

    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.0, 0.05])
    n = 200_000
    torch.manual_seed(0)
    draws = inverse_cdf_draw(probs.expand(n, -1))
    counts = torch.bincount(draws, minlength=len(probs)).double()
    assert counts[1] == counts[4] == 0  # zero-probability tokens are never drawn
    sigma = (n * probs.double() * (1 - probs.double())).sqrt()
    assert ((counts - n * probs.double()).abs() <= 4 * sigma).all(), counts / n
    assert not torch.equal(draws[:1000], inverse_cdf_draw(probs.expand(1000, -1)))  # it is random
    torch.manual_seed(0)
    assert torch.equal(inverse_cdf_draw(probs.expand(n, -1)), draws)  # and seeded


def test_inverse_cdf_sampler_is_seeded_and_differs_from_generates_draws(llama):
    cfg = _cfg("static", sampler="inverse_cdf")
    first = _generate(llama, cfg)
    assert _generate(llama, cfg) == first
    assert first != _generate(llama, _cfg("generate"))
    assert all(len(g.token_ids) > 0 for per in first for g in per)


def _check_logprobs(backend, engine, sampling, sampler="multinomial"):
    cfg = _cfg("static", sampling, max_new_tokens=12)
    ids, attention = left_pad(PROMPTS, PAD)
    torch.manual_seed(3)
    decoded = engine.decode(ids, attention, record_logprobs=True, sampler=sampler,
                            **generate_kwargs(cfg, stop_ids={1}, pad_id=PAD))
    checked = 0
    for row, prompt in enumerate(PROMPTS):
        response = decoded.sequences[row, ids.shape[1]:]
        n = _length(response.tolist())
        full = torch.tensor([prompt + response[:n].tolist()])
        with torch.no_grad():
            logits = backend.model(input_ids=full).logits[0, len(prompt) - 1 : len(prompt) - 1 + n].double()
        # the temperature-scaled distribution before top-p, as SGLang reports it (kdlib's definition)
        expected = (logits / cfg.temperature).log_softmax(-1).gather(1, response[:n, None]).squeeze(1)
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(decoded.logprobs[row, :n].double(), expected, rtol=0, atol=2e-5)
        checked += n
    assert checked >= 30


def _length(tokens: list[int], stop: int = 1) -> int:
    return tokens.index(stop) + 1 if stop in tokens else len(tokens)


def test_stop_tokens_and_length(llama):
    # greedy, no stop tokens: every row runs to max_new_tokens; then stop at a token row 0 emits
    free = _generate(llama, _cfg("auto", "greedy"), stop_ids=set())
    assert all(g.finish_reason == "length" and len(g.token_ids) == 16 for per in free for g in per)
    stop = free[0][0].token_ids[3]
    plain = _generate(llama, _cfg("generate", "greedy"), stop_ids={stop})
    engine = _generate(llama, _cfg("auto", "greedy"), stop_ids={stop})
    assert engine == plain
    reasons = set()
    for per_prompt in engine:
        for g in per_prompt:
            reasons.add(g.finish_reason)
            if g.finish_reason == "stop":  # ends at the first stop token, which is kept
                assert g.token_ids[-1] == stop and stop not in g.token_ids[:-1]
            else:  # cut by max_new_tokens: no stop token, none added
                assert len(g.token_ids) == 16 and stop not in g.token_ids
    assert reasons == {"stop", "length"}
    assert len(engine[0][0].token_ids) <= 4


def test_engine_state_is_kept_across_calls(llama):
    engine = llama.engine(RolloutEngine.static)
    _generate(llama, _cfg("static"))
    caches = dict(engine._caches)
    assert {3, 2} <= {batch for batch, _ in caches}  # batches of 3 and the remainder of 2
    _generate(llama, _cfg("static"))
    assert llama.engine(RolloutEngine.static) is engine
    assert all(engine._caches[key] is cache for key, cache in caches.items())


def _check_weight_sync(path, engine_kind, warm=None):
    """Negate the lm_head of a warmed-up engine: the next call decodes with the new head, exactly
    as a fresh engine given the same weights does."""
    warm = warm or _backend(path)
    for sampling in ("greedy", "sampling"):
        _generate(warm, _cfg(engine_kind, sampling))  # warm up (and compile) with the old weights
    before = {s: _generate(warm, _cfg(engine_kind, s)) for s in ("greedy", "sampling")}
    new_head = -warm.model.lm_head.weight.detach().clone()
    warm.load_weights({"lm_head.weight": new_head})
    fresh = _backend(path)
    fresh.load_weights({"lm_head.weight": new_head})
    for sampling in ("greedy", "sampling"):
        after = _generate(warm, _cfg(engine_kind, sampling))
        assert after != before[sampling]
        assert after == _generate(fresh, _cfg(engine_kind, sampling))
        assert after == _generate(fresh, _cfg("generate", sampling))
    return warm


def test_synced_weights_are_used_at_the_next_call(tiny_llama):
    _check_weight_sync(tiny_llama, "static")


def test_unsupported_model_falls_back_to_generate_with_one_reason(tiny_dir, chatml_tokenizer_dir, caplog):
    from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM

    path = tiny_dir / "mamba"
    if not path.exists():
        tokenizer = AutoTokenizer.from_pretrained(str(chatml_tokenizer_dir))
        torch.manual_seed(0)
        config = MambaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, state_size=4)
        MambaForCausalLM(config).save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
    backend = _backend(path, attn_implementation="eager")  # a state-space model: no KV cache at all
    with caplog.at_level(logging.INFO, logger="kdlib.backends.hf.rollout"):
        auto = [_generate(backend, _cfg("auto")) for _ in range(2)]
    reasons = [r.getMessage() for r in caplog.records if "rollout.engine=static" in r.getMessage()]
    assert len(reasons) == 1 and "plain generate" in reasons[0] and "MambaForCausalLM" in reasons[0]
    assert backend.engine(RolloutEngine.auto) is None
    assert auto[0] == auto[1] == _generate(backend, _cfg("generate"))


def _raising_compile(fn, **kwargs):
    def compiled(*args, **kw):
        raise RuntimeError("inductor: no C++ compiler (simulated)")
    return compiled


def _miscompiling_compile(fn, **kwargs):  # e.g. the NaNs inductor's AVX2 code gives SmolLM2 at 1 thread
    def compiled(*args, **kw):
        return fn(*args, **kw) * float("nan")
    return compiled


@pytest.mark.parametrize("compile, reason", [(_raising_compile, "no C++ compiler"), (_miscompiling_compile, "disagrees")])
def test_compile_failure_falls_back_to_the_eager_loop(tiny_llama, monkeypatch, caplog, compile, reason):
    import kdlib.backends.hf.decode.engine as engine_module

    monkeypatch.setattr(engine_module.torch, "compile", compile)
    backend = _backend(tiny_llama)
    with caplog.at_level(logging.WARNING, logger="kdlib.backends.hf.decode.engine"):
        outs = [_generate(backend, _cfg("compiled")) for _ in range(2)]
    reasons = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(reasons) == 1 and reason in reasons[0]
    assert not backend.engine(RolloutEngine.compiled).compiled
    assert outs[0] == outs[1] == _generate(backend, _cfg("generate"))  # the redo drew the same numbers


@pytest.mark.slow
def test_compiled_engine_matches_generate_and_the_students_logprobs(tiny_qwen3):
    backend = _backend(tiny_qwen3)
    for sampling in sorted(SAMPLING):
        compiled = _generate(backend, _cfg("compiled", sampling))
        assert backend.engine(RolloutEngine.compiled).compiled  # it did compile
        # token equality holds on these shapes; where compile reorders float32 sums tokens may
        # differ, and the log-probability check below is what must hold
        assert compiled == _generate(backend, _cfg("generate", sampling))
    for sampling in ("sampling", "top_p"):
        _check_logprobs(backend, backend.engine(RolloutEngine.compiled), sampling)


@pytest.mark.slow
def test_synced_weights_reach_the_compiled_graph(tiny_llama):
    backend = _check_weight_sync(tiny_llama, "compiled")
    assert backend.engine(RolloutEngine.compiled).compiled


@pytest.mark.slow
def test_frozen_engine_matches_generate(tiny_qwen3):
    backend = _backend(tiny_qwen3)
    for sampling in sorted(SAMPLING):
        frozen = _generate(backend, _cfg("frozen", sampling))
        engine = backend.engine(RolloutEngine.frozen)
        assert engine.compiled and engine.frozen  # it did compile, with frozen weights
        assert frozen == _generate(backend, _cfg("generate", sampling))


@pytest.mark.slow
def test_synced_weights_reach_the_frozen_engine(tiny_llama):
    """The frozen step reads packed copies of the weights: the sync repacks them in place, without
    compiling again (the check negates the head and compares with a fresh engine and generate)."""
    backend = _backend(tiny_llama)
    for sampling in ("greedy", "sampling"):
        _generate(backend, _cfg("frozen", sampling))
    frozen = backend.engine(RolloutEngine.frozen)
    step, packings = frozen._step, len(frozen._packed)
    assert frozen.frozen and frozen._repacks and packings > 0  # inductor packed the weights
    _check_weight_sync(tiny_llama, "frozen", warm=backend)
    assert backend.engine(RolloutEngine.frozen) is frozen and frozen.frozen and frozen._repacks
    assert frozen._step is step and len(frozen._packed) == packings  # repacked, never compiled again


@pytest.mark.parametrize("follows", [True, False])
def test_a_weight_load_repacks_the_frozen_engine_or_recompiles_it(tiny_llama, monkeypatch, follows):
    """A frozen step that follows moved weights once repacked is repacked at a weight load; one that
    does not is compiled again. Static and compiled engines read the parameters: nothing happens."""
    import kdlib.backends.hf.decode.engine as engine_module

    compiles, resets, checks = [], [], []

    def recording_compile(fn, **kwargs):
        compiles.append(fn)
        return fn  # decodes eagerly: what is checked is when a step is compiled

    def follows_weights(model, packed, compare, tolerance):
        checks.append(compare())  # the compiled step is redone against eager: 0 here
        return follows

    monkeypatch.setattr(engine_module.torch, "compile", recording_compile)
    monkeypatch.setattr(engine_module.torch.compiler, "reset", lambda: resets.append(True))
    monkeypatch.setattr(engine_module, "follows_weights", follows_weights)
    backend = _backend(tiny_llama)
    pairs = _generate(backend, _cfg("frozen", batch_size=2))  # 2-row batches first: a shape
    outs = [_generate(backend, _cfg(kind)) for kind in ("static", "compiled", "frozen")]  # 3 rows: another
    assert outs[0] == outs[1] == outs[2]  # the check put the cache slot back as it was
    assert pairs == _generate(backend, _cfg("static", batch_size=2))
    frozen = backend.engine(RolloutEngine.frozen)
    assert len(compiles) == 2 and frozen.frozen and not resets
    assert checks == ([0.0, 0.0] if follows else [0.0])  # each batch shape (2, 3) until one does not follow
    refreshes = []
    monkeypatch.setattr(frozen._packed, "refresh", lambda: refreshes.append(True))
    for bucket in ({"lm_head.weight": backend.model.lm_head.weight.detach().clone()},
                   {"model.norm.weight": backend.model.model.norm.weight.detach().clone()}):
        backend.load_weights(bucket)  # a sync in two buckets
    if follows:
        assert len(compiles) == 2 and not resets and not refreshes  # repacked at the next call, once
        _generate(backend, _cfg("frozen"))
        assert refreshes == [True] and len(compiles) == 2
    else:
        assert len(compiles) == 4 and compiles[-1] == frozen._frozen_forward and resets == [True, True]
        assert not refreshes
    assert backend.engine(RolloutEngine.frozen) is frozen and frozen.frozen


def test_reserve_sizes_a_compiled_engines_cache_once(tiny_llama, monkeypatch):
    """The longest prompt announced before decoding sizes a compiled engine's cache, so a longer
    prompt later reuses the cache length (hence the compiled graph) of the first call; eager caches
    stay tight. The tokens are generate's either way."""
    import kdlib.backends.hf.decode.engine as engine_module

    monkeypatch.setattr(engine_module.torch, "compile", lambda fn, **kwargs: fn)  # decodes eagerly
    backend = _backend(tiny_llama)
    backend.reserve(300)  # before the engines exist
    cfg = _cfg("compiled", n_samples_per_prompt=1, batch_size=4)
    assert _generate(backend, cfg) == _generate(backend, _cfg("generate", n_samples_per_prompt=1, batch_size=4))
    compiled = backend.engine(RolloutEngine.compiled)
    lengths = {length for (_, length) in compiled._caches}
    assert lengths == {2 * engine_module.COMPILED_CAPACITY_STEP}  # 300 rounded up, not 16 + 16
    static = backend.engine(RolloutEngine.static)
    _generate(backend, _cfg("static", n_samples_per_prompt=1, batch_size=4))
    assert {length for (_, length) in static._caches} == {engine_module.EAGER_CAPACITY_STEP}
    backend.reserve(700)  # on the engines that exist
    _generate(backend, cfg)
    assert max(length for (_, length) in compiled._caches) == 3 * engine_module.COMPILED_CAPACITY_STEP


def test_a_smaller_batch_runs_in_the_compiled_step_of_a_larger_one(tiny_llama, monkeypatch):
    """Batches of 3, 3 and 2 rows (4 prompts x 2 samples, batch_size 3): a compiled engine decodes
    the 2-row batch in its 3-row step, the extra row a copy of the first and its output ignored, so
    one shape is compiled and checked, not two; the tokens are generate's. Eager engines keep each
    batch's own size."""
    import kdlib.backends.hf.decode.engine as engine_module

    monkeypatch.setattr(engine_module.torch, "compile", lambda fn, **kwargs: fn)  # decodes eagerly
    backend = _backend(tiny_llama)
    for sampling in ("sampling", "greedy"):
        assert _generate(backend, _cfg("compiled", sampling)) == _generate(backend, _cfg("generate", sampling))
    compiled = backend.engine(RolloutEngine.compiled)
    assert {rows for rows, _ in compiled._caches} == {3}
    assert {rows for rows, _ in compiled._verified} == {3}
    _generate(backend, _cfg("static"))
    assert {rows for rows, _ in backend.engine(RolloutEngine.static)._caches} == {2, 3}


@pytest.fixture(scope="module")
def one_layer_llama(tiny_dir, chatml_tokenizer_dir):
    """A one-layer Llama: the smallest graph the compiled engines compile (the fast variants)."""
    from kdlib.demo.text import build_model

    path = tiny_dir / "llama_1layer"
    if not path.exists():
        build_model(path, arch="llama", tokenizer_dir=chatml_tokenizer_dir, num_layers=1)
    return path


@pytest.mark.parametrize("kind", ["compiled", "frozen"])
def test_compiled_engines_sample_generates_tokens_and_follow_a_weight_sync(one_layer_llama, kind):
    """The fast variant of the slow compiled/frozen tests: one layer, one batch shape, greedy and
    sampled; the step really compiles (frozen: inductor packs the weights), decodes generate's
    tokens, and after a weight load decodes with the new weights without compiling again."""
    backend = _backend(one_layer_llama)
    short = dict(max_new_tokens=6, batch_size=len(PROMPTS))
    for sampling in ("greedy", "sampling"):
        assert _generate(backend, _cfg(kind, sampling, **short)) == _generate(backend, _cfg("generate", sampling, **short))
    engine = backend.engine(RolloutEngine(kind))
    assert engine.compiled and engine.frozen == (kind == "frozen")
    if kind == "frozen":
        assert len(engine._packed) > 0  # inductor packed the weights, and they are followed
    step = engine._step
    new_head = -backend.model.lm_head.weight.detach().clone()
    before = _generate(backend, _cfg(kind, "greedy", **short))
    backend.load_weights({"lm_head.weight": new_head})
    after = _generate(backend, _cfg(kind, "greedy", **short))
    fresh = _backend(one_layer_llama)
    fresh.load_weights({"lm_head.weight": new_head})
    assert after != before and after == _generate(fresh, _cfg("generate", "greedy", **short))
    assert backend.engine(RolloutEngine(kind)) is engine and engine._step is step  # not compiled again
