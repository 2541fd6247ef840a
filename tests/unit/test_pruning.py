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


# --- kdlib.pruning: importance-based depth and width pruning -----------------------------------

from contextlib import contextmanager  # noqa: E402
from dataclasses import replace  # noqa: E402

from kdlib.pruning import PruneConfig, load_source, prune_model, prune_to_directory  # noqa: E402
from kdlib.pruning.calibration import TextModel, select_calibration  # noqa: E402
from kdlib.pruning.importance import compute_scores  # noqa: E402
from kdlib.pruning.layer_kl import drop_one_kl, greedy_kl, reference_log_probs  # noqa: E402
from kdlib.pruning.calibration import record  # noqa: E402
from kdlib.pruning.selection import select_layers  # noqa: E402


def _calibration(n_rows: int = 12, seed: int = 0, vocab: int = 300) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 24, (n_rows,), generator=g)
    return [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in lengths]


def _ids(vocab: int = 300, length: int = 9) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(5))


QUICK = dict(calibration_tokens=128, kl_tokens=48)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen3"])
def test_nothing_removed_equals_the_source_bit_for_bit(fixture, request):
    source = load_source(request.getfixturevalue(fixture))
    pruned, plan, _, _ = prune_model(source, _calibration(), PruneConfig(layer_kl_scores=False, **QUICK))
    assert plan.layers == list(range(4))
    with torch.no_grad():
        assert torch.equal(pruned(input_ids=_ids()).logits, source(input_ids=_ids()).logits)
    for (name, a), (_, b) in zip(source.state_dict().items(), pruned.state_dict().items()):
        assert torch.equal(a, b), name


@contextmanager
def _units_zeroed(model, plan):
    """The source with every head and MLP channel the plan drops silenced (zeroed before o_proj /
    down_proj), layers the plan drops skipped: what the pruned model must compute exactly."""
    text = TextModel.of(model)
    head_dim, handles = text.head_dim, []

    def zero_except(kept, unit):
        def hook(module, args):
            mask = torch.zeros(args[0].shape[-1])
            for k in kept:
                mask[k * unit:(k + 1) * unit] = 1
            return (args[0] * mask,)
        return hook

    for position, index in enumerate(plan.layers):
        layer = text.layers[index]
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(zero_except(plan.heads[position], head_dim)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(zero_except(plan.channels[position], 1)))
    original = text.decoder.layers
    text.decoder.layers = torch.nn.ModuleList([original[i] for i in plan.layers])
    layer_types = getattr(text.config, "layer_types", None)
    n_layers = text.config.num_hidden_layers
    text.config.num_hidden_layers = len(plan.layers)
    if layer_types is not None:
        text.config.layer_types = [layer_types[i] for i in plan.layers]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        text.decoder.layers = original
        text.config.num_hidden_layers = n_layers
        if layer_types is not None:
            text.config.layer_types = layer_types


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen3"])
def test_kept_layers_heads_and_channels_compute_the_sources_partial_outputs(fixture, request):
    source = load_source(request.getfixturevalue(fixture))
    cfg = PruneConfig(num_layers=3, num_attention_heads=2, num_key_value_heads=1, intermediate_size=40,
                      layer_kl_scores=False, **QUICK)
    pruned, plan, _, sizes = prune_model(source, _calibration(), cfg)
    assert (sizes.num_attention_heads, sizes.num_key_value_heads, sizes.intermediate_size) == (2, 1, 40)
    assert pruned.config.head_dim == TextModel.of(source).head_dim  # head_dim never changes
    with torch.no_grad(), _units_zeroed(source, plan):
        expected = source(input_ids=_ids()).logits
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=_ids()).logits, expected, rtol=1e-5, atol=1e-5)


def test_hidden_channels_keep_the_sources_projections_on_the_kept_channels(tiny_qwen3):
    source = load_source(tiny_qwen3)
    pruned, plan, _, _ = prune_model(source, _calibration(), PruneConfig(hidden_size=48, layer_kl_scores=False, **QUICK))
    kept = torch.tensor(plan.hidden)
    ids = _ids()
    torch.testing.assert_close(pruned.model.embed_tokens(ids), source.model.embed_tokens(ids)[..., kept])
    x = torch.zeros(3, 64)
    x[:, kept] = torch.randn(3, 48, generator=torch.Generator().manual_seed(0))
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"):
        big, small = source.model.layers[1].get_submodule(name), pruned.model.layers[1].get_submodule(name)
        torch.testing.assert_close(small(x[:, kept]), big(x), rtol=1e-5, atol=1e-6)
    down_big, down_small = source.model.layers[1].mlp.down_proj, pruned.model.layers[1].mlp.down_proj
    a = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(down_small(a), down_big(a)[:, kept])
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()  # still tied
    torch.testing.assert_close(pruned.model.layers[0].self_attn.q_norm.weight, source.model.layers[0].self_attn.q_norm.weight)


def test_grouped_kv_heads_stay_consistent(tiny_qwen3):
    """4 query heads over 2 KV heads: query heads 0-1 read KV head 0, heads 2-3 KV head 1."""
    source = load_source(tiny_qwen3)
    for heads, kv in ((2, 2), (2, 1), (4, 2)):
        _, plan, _, _ = prune_model(
            source, _calibration(), PruneConfig(num_attention_heads=heads, num_key_value_heads=kv, layer_kl_scores=False, **QUICK)
        )
        for kept_heads, kept_kv in zip(plan.heads, plan.kv_heads):
            assert len(kept_kv) == kv and len(kept_heads) == heads
            per_group = heads // kv
            for j, head in enumerate(kept_heads):  # the j-th kept head reads the (j // per_group)-th kept KV head
                assert head // 2 == kept_kv[j // per_group]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen3"])
def test_pruned_checkpoint_saves_reloads_and_generates(fixture, request, tmp_path):
    from transformers import AutoTokenizer

    path = request.getfixturevalue(fixture)
    cfg = PruneConfig(num_layers=3, depth="greedy_kl", num_attention_heads=2, intermediate_size=64, hidden_size=48, **QUICK)
    result = prune_to_directory(path, AutoTokenizer.from_pretrained(path), _calibration(), cfg, tmp_path / "out")
    assert result.params_after < result.params_before and len(result.plan.layers) == 3
    for name in ("scores.json", "importance.png", "prune.json", "config.json", "tokenizer.json"):
        assert (tmp_path / "out" / name).is_file(), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (reloaded.config.num_hidden_layers, reloaded.config.hidden_size, reloaded.config.intermediate_size) == (3, 48, 64)
    assert sum(p.numel() for p in reloaded.parameters()) == result.params_after
    out = reloaded.generate(input_ids=_ids()[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)


@pytest.mark.parametrize("family", ["idefics3", "gemma3"])
def test_vlm_language_model_prunes_in_depth_heads_and_mlp(family, tiny_vlm, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_vlm(family)
    source = load_source(path)
    assert type(source).__name__.endswith("ForConditionalGeneration")
    cfg = PruneConfig(num_layers=2, depth="layer_kl", num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, **QUICK)
    result = prune_to_directory(source, AutoProcessor.from_pretrained(path), _calibration(vocab=200), cfg, tmp_path / "out")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    text = reloaded.config.get_text_config()
    assert (text.num_hidden_layers, text.num_attention_heads, text.intermediate_size) == (2, 2, 64)
    if family == "gemma3":
        assert text.layer_types == [source.config.text_config.layer_types[i] for i in result.plan.layers]
    vision = {k: v for k, v in source.state_dict().items() if "vision" in k}
    for key, value in vision.items():  # the vision tower is untouched
        assert torch.equal(reloaded.state_dict()[key], value), key
    out = reloaded.generate(input_ids=_ids(vocab=200)[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 12)
    with pytest.raises(ConfigError, match="cannot prune the hidden size"):
        prune_model(source, _calibration(vocab=200), PruneConfig(hidden_size=32, layer_kl_scores=False, **QUICK))


def test_scores_are_reproducible_under_a_seed(tiny_llama):
    source = load_source(tiny_llama)
    cfg = PruneConfig(num_layers=2, depth="greedy_kl", **QUICK)

    def scores(seed):
        rows = select_calibration(_calibration(), cfg.calibration_tokens, seed)
        out = compute_scores(source, rows, cfg, n_drop=2).as_dict()
        out.pop("seconds")
        return out

    first = scores(0)
    assert scores(0) == first
    assert scores(1)["block_influence"] != first["block_influence"]
    assert sum(map(len, select_calibration(_calibration(), 100, 0))) == 100


def test_replayed_drop_one_kl_equals_the_kl_of_the_model_without_that_layer(tiny_llama):
    source = load_source(tiny_llama)
    text = TextModel.of(source)
    rows = [torch.tensor(r) for r in _calibration(3)]
    rec = record(source, rows, kl_tokens=10_000)
    reference = reference_log_probs(text, rec.kl_rows)
    scores = drop_one_kl(text, rec, reference)
    for drop in range(4):
        without = prune_decoder_layers(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), [i for i in range(4) if i != drop])
        total = sum(
            torch.nn.functional.kl_div(torch.log_softmax(without(input_ids=ids[None]).logits[0], -1), ref, log_target=True,
                                       reduction="sum").item()
            for ids, ref in zip(rows, reference)
        )
        assert scores[drop] == pytest.approx(total / sum(r.numel() for r in rows), rel=1e-4)
    dropped, trajectory = greedy_kl(text, rec, reference, 2)
    assert dropped[0] == min(range(4), key=scores.__getitem__) and trajectory[0] == pytest.approx(min(scores))
    assert len(set(dropped)) == 2


def test_depth_methods_choose_the_documented_layers(tiny_llama):
    source = load_source(tiny_llama)
    rows = select_calibration(_calibration(), 128, 0)
    scores = compute_scores(source, rows, PruneConfig(**QUICK))
    scores = replace(scores, block_influence=[0.5, 0.1, 0.3, 0.2], layer_kl=[3.0, 0.2, 0.1, 9.0],
                     angular={2: [0.5, 0.4, 0.1]}, greedy_dropped=[2, 0], greedy_kl=[0.1, 0.5])
    assert select_layers(scores, 4, 2, "evenly") == [0, 3]
    assert select_layers(scores, 4, 2, "last_span") == [0, 3]
    assert select_layers(scores, 4, 3, "last_span") == [0, 1, 3]
    assert select_layers(scores, 4, 2, "block_influence") == [0, 2]
    assert select_layers(scores, 4, 2, "angular") == [0, 1]  # the span 2..3 has the smallest distance
    assert select_layers(scores, 4, 2, "layer_kl") == [0, 3]
    assert select_layers(scores, 4, 3, "greedy_kl") == [0, 1, 3]


def test_a_parameter_budget_is_met_from_below(tiny_llama):
    from kdlib.pruning.budget import count_parameters

    source = load_source(tiny_llama)
    budget = 170_000
    for fit, step in (("intermediate_size", 16), ("hidden_size", 16), ("num_layers", 1)):
        pruned, _, _, sizes = prune_model(
            source, _calibration(), PruneConfig(params=budget, fit=fit, round_to=16, layer_kl_scores=False, **QUICK)
        )
        assert sum(p.numel() for p in pruned.parameters()) == count_parameters(type(source), source.config, sizes) <= budget
        one_more = replace(sizes, **{fit: getattr(sizes, fit) + step})
        assert count_parameters(type(source), source.config, one_more) > budget, fit


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(num_attention_heads=5), "num_attention_heads must be between 1 and 4"),
        (dict(num_attention_heads=3, num_key_value_heads=2), "must be a multiple of prune.num_key_value_heads"),
        (dict(num_attention_heads=4, num_key_value_heads=1), "more than the source's 2 per KV head"),
        (dict(num_layers=9), "num_layers must be between 1 and 4"),
        (dict(intermediate_size=1000), "intermediate_size must be between 1 and 128"),
        (dict(params=1000), "below the smallest model"),
        (dict(keep_layers=[0, 0]), "distinct indices"),
    ],
)
def test_impossible_requests_are_one_line_config_errors(options, message, tiny_llama):
    source = load_source(tiny_llama)
    with pytest.raises(ConfigError, match=message) as info:
        prune_model(source, _calibration(), PruneConfig(layer_kl_scores=False, **options, **QUICK))
    assert "\n" not in str(info.value)
