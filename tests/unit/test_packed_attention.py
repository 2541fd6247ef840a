"""``packed_sdpa``: per-sample attention on packed rows equals sdpa's block-diagonal mask (float64,
values and gradients), is sdpa itself everywhere else, and leaves no trace in a saved model."""

from __future__ import annotations

import pytest
import torch

from kdlib.batch import TokenBatch
from kdlib.models import packed_attention
from kdlib.models.forward import final_hidden_states


def _load(path, attention: str):
    from transformers import AutoModelForCausalLM

    packed_attention.register()
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention, dtype=torch.float64)


def _packed_row(lengths: list[int], vocab: int, seed: int = 0) -> TokenBatch:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, sum(lengths)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return TokenBatch(input_ids=ids, attention_mask=None, loss_mask=torch.ones_like(ids, dtype=torch.bool),
                      position_ids=positions)


def test_packed_row_kwargs_are_the_sample_boundaries():
    kwargs = packed_attention.packed_row_kwargs(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 9]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 4
    with pytest.raises(ValueError, match="one row"):
        packed_attention.packed_row_kwargs(torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen3"])
def test_packed_sdpa_equals_the_block_diagonal_mask(fixture, request):
    """Same hidden states and parameter gradients as transformers' sdpa with its packed-sequence
    mask, to float64 rounding, on a row of samples of uneven lengths (GQA in both tiny models)."""
    path = request.getfixturevalue(fixture)
    batch = _packed_row([7, 13, 1, 20], vocab=200)
    results = []
    for attention in ("sdpa", "packed_sdpa"):
        model = _load(path, attention)
        hidden = final_hidden_states(model, batch)
        weights = torch.linspace(-1, 1, hidden.numel(), dtype=hidden.dtype).reshape(hidden.shape)
        (hidden * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((hidden.detach(), grads))
    (ref_hidden, ref_grads), (hidden, grads) = results
    assert ref_hidden.abs().max() > 0.1  # not degenerate
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-10, atol=1e-10)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-9, atol=1e-10, msg=name)


def test_packed_sdpa_keeps_samples_apart(tiny_llama):
    """Changing one sample's tokens changes no other sample's hidden states."""
    model = _load(tiny_llama, "packed_sdpa")
    batch = _packed_row([9, 11, 6], vocab=200)
    changed = batch.input_ids.clone()
    changed[0, 9:20] = torch.flip(changed[0, 9:20], dims=[0]) + 1
    before = final_hidden_states(model, batch)
    after = final_hidden_states(model, TokenBatch(input_ids=changed, attention_mask=None,
                                                  loss_mask=batch.loss_mask, position_ids=batch.position_ids))
    torch.testing.assert_close(after[:, :9], before[:, :9], rtol=0, atol=0)
    torch.testing.assert_close(after[:, 20:], before[:, 20:], rtol=0, atol=0)
    assert not torch.allclose(after[:, 9:20], before[:, 9:20])


def test_packed_sdpa_runs_one_causal_attention_per_sample(tiny_llama, monkeypatch):
    """Packed rows reach sdpa once per sample and layer, causal and with no mask tensor."""
    import transformers.integrations.sdpa_attention as sdpa_module

    calls = []
    real = sdpa_module.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append((query.shape[2], attention_mask is None, kwargs.get("is_causal")))
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", spy)
    model = _load(tiny_llama, "packed_sdpa")
    final_hidden_states(model, _packed_row([5, 8, 3], vocab=200))
    assert calls == [(5, True, True), (8, True, True), (3, True, True)] * model.config.num_hidden_layers


@pytest.mark.parametrize("attention", ["packed_sdpa", "sdpa"])
def test_right_padded_rows_need_no_mask(attention, tiny_llama):
    """Without the mask (causal attention) the real positions of right-padded rows are what
    transformers gives with the padding mask, to float64 rounding."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    model = _load(tiny_llama, attention)
    ids = torch.randint(3, 200, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    batch = TokenBatch(input_ids=ids, attention_mask=mask, loss_mask=mask.bool())
    hidden = final_hidden_states(model, batch)
    reference = model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert isinstance(reference, BaseModelOutputWithPast)
    real = mask.bool()
    torch.testing.assert_close(hidden[real], reference.last_hidden_state[real], rtol=1e-10, atol=1e-10)


def test_left_padded_rows_keep_their_mask(tiny_llama):
    model = _load(tiny_llama, "packed_sdpa")
    ids = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    batch = TokenBatch(input_ids=ids, attention_mask=mask, loss_mask=mask.bool())
    reference = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    torch.testing.assert_close(final_hidden_states(model, batch), reference, rtol=0, atol=0)


def test_a_student_loaded_with_packed_sdpa_saves_a_plain_config(tiny_llama, tmp_path):
    import json

    model = _load(tiny_llama, "packed_sdpa")
    model.save_pretrained(tmp_path / "saved")
    config = (tmp_path / "saved" / "config.json").read_text()
    assert "packed_sdpa" not in config and json.loads(config)["model_type"] == "llama"


def test_compiled_single_query_attention_reads_each_kv_head_once(monkeypatch):
    """A compiled decode step's attention (one query, grouped key/value heads, a padding mask) folds
    the query heads onto their key/value head instead of repeating keys and values, and equals
    transformers' sdpa (which repeats them) in float64; uncompiled calls do not take that path."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    generator = torch.Generator().manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    query = torch.randn(2, 6, 1, 8, dtype=torch.float64, generator=generator)
    key, value = (torch.randn(2, 2, 11, 8, dtype=torch.float64, generator=generator) for _ in range(2))
    mask = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    mask[0, ..., 7:] = False  # row 0 attends to its first 7 slots only
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    folded = []
    real = packed_attention._single_query_on_kv_heads
    monkeypatch.setattr(packed_attention, "_single_query_on_kv_heads", lambda *a: folded.append(1) or real(*a))

    def attend(q, k, v, m):
        return packed_attention.packed_sdpa_attention(module, q, k, v, m, scaling=0.3)[0]

    eager = attend(query, key, value, mask)
    assert not folded
    compiled = torch.compile(attend, backend="eager", fullgraph=True)(query, key, value, mask)
    assert folded  # traced through the folded path
    assert compiled.shape == expected.shape == (2, 1, 6, 8)
    torch.testing.assert_close(eager, expected, rtol=0, atol=0)
    torch.testing.assert_close(compiled, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(real(module, query, key, value, mask, 0.3)[0], expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(expected[0], sdpa_attention_forward(module, query, key, value, None, scaling=0.3)[0][0])
