"""Depth pruning keeps the chosen layers' weights and gives a model that runs, generates and reloads."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdlib.errors import ConfigError
from kdlib.models.pruning import evenly_spaced_layers, prune_decoder_layers


def test_evenly_spaced_keeps_first_and_last():
    assert evenly_spaced_layers(30, 16)[0] == 0 and evenly_spaced_layers(30, 16)[-1] == 29
    assert len(evenly_spaced_layers(30, 16)) == 16
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_layers(4, 2) == [0, 3]
    with pytest.raises(ConfigError, match="between 1 and 4"):
        evenly_spaced_layers(4, 5)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen3"])
def test_pruned_model_equals_a_model_built_from_the_kept_layers(fixture, request, tmp_path):
    path = request.getfixturevalue(fixture)
    full = AutoModelForCausalLM.from_pretrained(path).eval()
    keep = [0, 2, 3]
    pruned = prune_decoder_layers(AutoModelForCausalLM.from_pretrained(path).eval(), keep)
    assert pruned.config.num_hidden_layers == 3
    for new, old in enumerate(keep):
        torch.testing.assert_close(pruned.model.layers[new].mlp.up_proj.weight, full.model.layers[old].mlp.up_proj.weight)

    # reference: run the full model's kept layers by hand
    ids = torch.randint(0, full.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _manual_forward(full, ids, keep)
        got = pruned(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # saves, reloads, and generates with a KV cache (layer indices renumbered)
    pruned.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, got)
        out = reloaded.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)


def test_bad_layer_lists_are_config_errors(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(ConfigError, match="distinct indices in \\[0, 3\\]"):
        prune_decoder_layers(model, [0, 0, 1])
    with pytest.raises(ConfigError, match="distinct indices"):
        prune_decoder_layers(model, [4])


def _manual_forward(model, ids, keep):
    """Embeddings -> kept layers -> final norm -> head, with the model's own rotary embedding."""
    inner = model.model
    hidden = inner.embed_tokens(ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    rotary = inner.rotary_emb(hidden, positions)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    for index in keep:
        out = inner.layers[index](hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
        hidden = out[0] if isinstance(out, tuple) else out
    return model.lm_head(inner.norm(hidden))
