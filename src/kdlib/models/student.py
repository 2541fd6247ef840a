"""Building the student: load, optionally depth-prune, set up for training."""

from __future__ import annotations

import logging

import torch
from torch import nn

from kdlib.config.schema import StudentConfig
from kdlib.models.loading import load_causal_lm
from kdlib.models.pruning import evenly_spaced_layers, prune_decoder_layers

log = logging.getLogger(__name__)


def build_student(cfg: StudentConfig, device: torch.device) -> nn.Module:
    """The student model on ``device`` in training mode."""
    model = load_causal_lm(cfg, device=device)
    keep = cfg.keep_layers
    if keep is None and cfg.num_layers is not None:
        keep = evenly_spaced_layers(model.config.get_text_config().num_hidden_layers, cfg.num_layers)
    if keep is not None:
        n_before = model.config.get_text_config().num_hidden_layers
        prune_decoder_layers(model, keep)
        log.info("student: kept decoder layers %s of %d", list(keep), n_before)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    return model
