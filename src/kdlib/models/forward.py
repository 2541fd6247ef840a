"""The forward pass shared by teacher and student: final hidden states at the loss positions.

Both models run only their decoder (no logits are computed here): the teacher ships these hidden
states, the student feeds its own to the loss together with both heads. Gathering with the batch's
loss mask gives rows in (sample, position) order, the order :class:`~kdlib.batch.TeacherOutput`
promises, so teacher row i and student row i predict the same token.

Neither form of batch needs a materialised attention mask in a causal decoder. Right padding comes
after every real token, and a real token attends only to itself and earlier tokens, so the mask is
dropped and attention runs with ``is_causal`` (sdpa then skips the upper half of the scores instead
of computing and masking them); the padded positions' own outputs change, and no loss row reads them.
Packed rows carry their samples' boundaries (``cu_seq_lens_q``), which the ``packed_sdpa`` and
flash-attention implementations use to attend within each sample only.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlib.batch import TokenBatch
from kdlib.models.head import decoder_of
from kdlib.models.packed_attention import packed_row_kwargs


def final_hidden_states(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Post-norm last-layer hidden states, [batch, length, hidden]."""
    if batch.vision is not None or batch.images is not None:
        from kdlib.models.vlm import vlm_final_hidden_states

        return vlm_final_hidden_states(model, batch)
    varlen = packed_row_kwargs(batch.position_ids) if batch.packed else {}
    out = decoder_of(model)(
        input_ids=batch.input_ids,
        attention_mask=None if batch.packed or _right_padded(batch.attention_mask) else batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        **varlen,
    )
    return out.last_hidden_state


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row's real tokens come first (a 1 never follows a 0)."""
    return not bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any())


def hidden_at_loss_positions(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Final hidden states at ``batch.loss_mask``, [n_loss_tokens, hidden]."""
    return final_hidden_states(model, batch)[batch.loss_mask]
