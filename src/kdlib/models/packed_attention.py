"""``packed_sdpa``: transformers' sdpa attention that computes nothing across the samples of a packed row.

A packed micro-batch is one row holding several samples, position ids restarting at 0 for each.
Under transformers' ``sdpa`` such a row gets a block-diagonal causal mask, and the CPU kernels
compute the row's whole square of scores before masking most of it away: for 4 samples of ~128
tokens that is 16x the attention a sample needs, a large share of a small model's forward pass.
This module registers one more attention implementation with transformers
(:class:`~transformers.AttentionInterface`, and sdpa's mask function under the same name): when the
caller passes the row's sample boundaries as ``cu_seq_lens_q`` (the keyword transformers' varlen
flash-attention path reads; :func:`kdlib.models.forward.final_hidden_states` passes them for packed
batches), each sample's attention runs alone with ``is_causal``. One more waste is removed in
compiled decoding: a single query with grouped key/value heads (GQA) under ``torch.compile``, where
transformers' sdpa repeats every key and value head for each query head it serves (it folds the
query heads onto the key/value heads only when not compiling); here the compiled call folds them
too, as the eager one does (SmolLM2's decode attention, CPU: ~80 us per layer instead of ~160).
Every other call (padded batches, generation without compile, vision towers) is transformers'
``sdpa`` unchanged. It is the default ``attn_implementation`` of teacher and student; the saved
student's config does not name it.
"""

from __future__ import annotations

import torch

NAME = "packed_sdpa"


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """sdpa per sample of a packed row (``cu_seq_lens_q`` given), plain sdpa otherwise.

    query [1, heads, row, head_dim] with key/value of the same row length; returns
    ([1, row, heads, head_dim], None) like transformers' ``sdpa_attention_forward``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _compiled_single_query_gqa(module, query, attention_mask, dropout, kwargs):
        return _single_query_on_kv_heads(module, query, key, value, attention_mask, scaling)
    bounds = kwargs.pop("cu_seq_lens_q", None)
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    edges = bounds.tolist()
    outputs = []
    for start, end in zip(edges[:-1], edges[1:]):
        out, _ = sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                        None, dropout=dropout, scaling=scaling, is_causal=causal, **kwargs)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def _compiled_single_query_gqa(module, query, attention_mask, dropout, kwargs) -> bool:
    if query.shape[2] != 1 or getattr(module, "num_key_value_groups", 1) == 1:
        return False  # every training and prefill call: decided before any import
    from transformers.utils.import_utils import is_torchdynamo_compiling

    return (
        is_torchdynamo_compiling() and dropout == 0.0 and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and (attention_mask is None or attention_mask.shape[1] == 1)  # one mask for every head
    )


def _single_query_on_kv_heads(module, query, key, value, attention_mask, scaling):
    """One query token per row: the query heads of each group become that key/value head's query
    rows, so attention reads each key/value head once (what transformers' ``pack_gqa`` does when
    not compiling). query [batch, heads, 1, dim], key/value [batch, kv_heads, length, dim]."""
    batch, heads, _, dim = query.shape
    grouped = query.reshape(batch, heads // module.num_key_value_groups, module.num_key_value_groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, 1, heads, value.shape[-1]), None


def register() -> None:
    """Make ``attn_implementation="packed_sdpa"`` loadable (registering again changes nothing; every
    process that loads a model calls it, Ray workers included)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def packed_row_kwargs(position_ids: torch.Tensor) -> dict:
    """The varlen keywords of one packed row: sample boundaries ``[0, end_1, ..., row]`` (int32, as
    flash-attention's varlen kernels want them) for queries and keys, and the longest sample."""
    if position_ids.shape[0] != 1:
        raise ValueError(f"a packed batch is one row, got position_ids of shape {tuple(position_ids.shape)}")
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    end = torch.tensor([flat.numel()], device=flat.device)
    bounds = torch.cat([starts, end]).to(torch.int32)
    longest = int((bounds[1:] - bounds[:-1]).max())
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}
