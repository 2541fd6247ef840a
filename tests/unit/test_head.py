"""The head contract: lm_head(final hidden state) == model logits, or a loud failure."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdlib.models.forward import final_hidden_states
from kdlib.models.head import HeadMismatchError, lm_head_of, verify_lm_head
from kdlib.batch import TokenBatch


def _batch(vocab: int) -> TokenBatch:
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(3))
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0
    return TokenBatch(ids, attention, attention.bool())


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen3"])
def test_head_reproduces_logits(fixture, request):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture)).eval()
    head = lm_head_of(model)
    verify_lm_head(model, head)
    batch = _batch(head.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        recomputed = head.logits(final_hidden_states(model, batch))
    real = batch.attention_mask.bool()  # padded positions run unmasked (models/forward.py) and are never read
    torch.testing.assert_close(recomputed[real], logits[real], rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_the_head(tiny_qwen3):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    assert lm_head_of(model).weight is model.get_input_embeddings().weight


def test_soft_capping_is_part_of_the_head(tmp_path):
    from transformers import Gemma2Config

    config = Gemma2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 2.0)  # logits well beyond the cap
    head = lm_head_of(model)
    assert head.softcap == 3.0
    verify_lm_head(model, head)
    head.softcap = None
    with pytest.raises(HeadMismatchError, match="logits are not lm_head"):
        verify_lm_head(model, head)


def test_unknown_output_transform_fails_loudly(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model.config.logit_scale = 2.0  # claims a scale the Llama forward does not apply
    with pytest.raises(HeadMismatchError, match="kdlib does not know"):
        verify_lm_head(model, lm_head_of(model))
