"""A student with its own tokenizer: the vocabulary transfer run when the student is built.

``student.tokenizer`` may name a tokenizer whose vocabulary differs from the one ``student.model``
was trained with (the demo: SmolLM2's weights with kdlib's 4,096-token demo tokenizer). The
model's embedding and head rows then belong to the old vocabulary, so they are rebuilt for the new
one by fast vocabulary transfer (:func:`kdlib.xtok.transfer.transfer_vocabulary`: each new token
from the old rows of the text it spells). It runs on the pruned model, whatever builds it (the
student, its rollout engines, a self-distillation teacher), so all of them have the same shapes;
pruning keeps or drops decoder layers only, and the embedding and head rows do not depend on
which layers remain, so the result is the same in either order.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

from torch import nn

from kdlib.config.schema import StudentConfig
from kdlib.errors import ModelError
from kdlib.models.loading import load_tokenizer
from kdlib.xtok.transfer import TransferReport, transfer_vocabulary

log = logging.getLogger(__name__)


def transfer_student_vocabulary(model: nn.Module, cfg: StudentConfig) -> Optional[TransferReport]:
    """Give ``model`` the vocabulary of ``cfg.tokenizer`` when it differs from the vocabulary of the
    tokenizer saved with ``cfg.model`` (in place); None when there is nothing to transfer."""
    if not cfg.tokenizer:
        return None
    try:
        own = load_tokenizer(replace(cfg, tokenizer=None, chat_template=None))
    except ModelError:  # no tokenizer saved with the weights: the configured one is theirs
        return None
    new = load_tokenizer(cfg)
    if own.get_vocab() == new.get_vocab():
        return None
    report = transfer_vocabulary(model, own, new)
    log.info(
        "student vocabulary transferred from %s (%d tokens) to %s (%d tokens): %d rows copied, %d averaged "
        "from the old tokens of their text, %d special, %d without counterpart (mean row)",
        cfg.model, len(own), cfg.tokenizer, len(new), report.copied, report.averaged, report.special, report.fallback,
    )
    return report
