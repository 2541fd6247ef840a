"""The forward pass shared by teacher and student: final hidden states at the loss positions.

Both models run only their decoder (no logits are computed here): the teacher ships these hidden
states, the student feeds its own to the loss together with both heads. Gathering with the batch's
loss mask gives rows in (sample, position) order, the order :class:`~kdlib.batch.TeacherOutput`
promises, so teacher row i and student row i predict the same token.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlib.batch import TokenBatch
from kdlib.models.head import decoder_of


def final_hidden_states(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Post-norm last-layer hidden states, [batch, length, hidden]."""
    if batch.vision is not None or batch.images is not None:
        from kdlib.models.vlm import vlm_final_hidden_states

        return vlm_final_hidden_states(model, batch)
    out = decoder_of(model)(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return out.last_hidden_state


def hidden_at_loss_positions(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Final hidden states at ``batch.loss_mask``, [n_loss_tokens, hidden]."""
    return final_hidden_states(model, batch)[batch.loss_mask]
