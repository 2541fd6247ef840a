"""The SGLang backends on a real GPU with the real sglang (marker `gpu`; skipped without CUDA or
without sglang installed with its dependencies: pip install 'kdlib[sglang]').

Nothing here has run yet: no GPU was available when it was written (see docs/gpu.md). Each test
compares against an independent reference and can fail.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def sglang():
    module = pytest.importorskip("sglang")
    from kdlib.backends.sglang.engine import check_version

    check_version()
    return module


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory, chatml_tokenizer_dir):
    """A small Llama SGLang's kernels accept (head_dim 64), bf16, with get_weights_by_name support."""
    from kdlib.demo.text import build_model

    path = tmp_path_factory.mktemp("gpu") / "llama256"
    model = build_model(path, arch="llama", tokenizer_dir=chatml_tokenizer_dir, hidden_size=256, num_layers=2)
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def _batch(vocab: int = 380):
    from kdlib.batch import TokenBatch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 48), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 30:] = 0
    attention[3, 17:] = 0
    loss = torch.zeros_like(ids, dtype=torch.bool)
    loss[:, 8:16] = True
    loss[0, 16:47] = True
    return TokenBatch(ids * attention, attention, loss)


def _teacher(path, backend: str, **options):
    from kdlib.config import Precision, TeacherConfig
    from kdlib.backends import TEACHER_BACKENDS

    cfg = TeacherConfig(model=str(path), backend=backend, dtype=Precision.bfloat16)
    cfg.sglang.offload_tags = []
    cfg.sglang.mem_fraction_static = 0.3
    for key, value in options.items():
        setattr(cfg.sglang, key, value)
    return TEACHER_BACKENDS.get(backend)(cfg, torch.device("cuda"))


def test_sglang_teacher_hidden_states_equal_the_hf_teachers(sglang, small_llama):
    """Same rows, bf16 tolerance: SGLang's kernels differ from transformers' in rounding only."""
    batch = _batch()
    engine = _teacher(small_llama, "sglang")
    got = engine.score(batch).hidden.float().cpu()
    expected = _teacher(small_llama, "hf").score(batch.to("cuda")).hidden.float().cpu()
    assert got.shape == expected.shape == (batch.n_loss_tokens, 256)
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative < 2e-2, relative
    check = engine.head_check
    assert check.max_error <= check.tolerance


def test_head_self_check_rejects_a_wrong_head_on_the_real_engine(sglang, small_llama, tiny_llama):
    from dataclasses import replace

    from kdlib.errors import ModelError
    from kdlib.backends.sglang.teacher import check_head

    backend = _teacher(small_llama, "sglang")
    with pytest.raises(ModelError, match="head self-check failed"):
        check_head(backend.engine, replace(backend.lm_head(), logit_scale=1.1))


def test_colocated_teacher_frees_the_gpu_and_keeps_its_weights(sglang, small_llama):
    backend = _teacher(small_llama, "sglang", offload_tags=["kv_cache", "weights", "cuda_graph"])
    batch = _batch()
    before = backend.score(batch).hidden
    free_awake, _ = torch.cuda.mem_get_info()
    backend.sleep()
    free_asleep, _ = torch.cuda.mem_get_info()
    assert free_asleep > free_awake + 100 * 2**20  # the KV cache pool alone is far larger
    backend.wake()
    assert torch.equal(backend.score(batch).hidden, before)


def _engine_weights(backend, names):
    engine = backend.engine._engine  # get_weights_by_name: SGLang's test hook (Llama supports it)
    return {name: torch.tensor(engine.get_weights_by_name(name, truncate_size=10**6)) for name in names}


@pytest.mark.parametrize("release_memory", [False, True])
def test_rollout_weight_sync_is_bit_exact(sglang, small_llama, release_memory):
    from kdlib.config import SGLangRolloutConfig, StudentConfig
    from kdlib.models.loading import load_causal_lm
    from kdlib.models.weights import state_buckets
    from kdlib.backends.sglang.rollout import SGLangRolloutBackend

    cfg = SGLangRolloutConfig(max_new_tokens=8, temperature=0.0)
    cfg.sglang.release_memory = release_memory
    cfg.sglang.mem_fraction_static = 0.3
    student = StudentConfig(model=str(small_llama), dtype="bfloat16")
    backend = SGLangRolloutBackend(student, torch.device("cuda"), cfg)
    model = load_causal_lm(student, device=torch.device("cpu"))
    for step in range(2):  # with release_memory the second sync follows a release
        g = torch.Generator().manual_seed(step)
        state = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype)
                 for k, v in model.state_dict().items()}
        for bucket in state_buckets(state, 2**20):
            backend.load_weights(bucket)
        backend.generate([[1, 2, 3, 4]], cfg, stop_ids={0}, pad_id=0, seed=0)  # closes the update
        if release_memory:
            backend._resume(["weights"])  # read the loaded weights, not a released pool
        names = [n for n in state if n.endswith("weight")]
        for name, value in _engine_weights(backend, names).items():
            assert torch.equal(value.reshape(state[name].shape), state[name].float()), name
        if release_memory:
            backend._release(["weights"])
