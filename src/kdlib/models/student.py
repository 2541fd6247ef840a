"""Models as configured: loaded and depth-pruned (any role), and set up for training (the student).

The rollout engine of on-policy KD and a self-distillation teacher are built from the student's
config by :func:`build_model`, so they have exactly the student's architecture (pruning and a
transferred vocabulary included) and its initial weights. Only the training student goes on through
the student transforms (``models/transforms.py``: LoRA, freezing), which is why those give their
weights back in the plain layout :func:`build_model` makes. A vision-language checkpoint (read from its config) loads as one
(:func:`kdlib.models.vlm.build_vlm`: the language model's decoder pruned, the vision tower kept),
and a vision-language student's vision side is frozen unless ``student.freeze_vision=false``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdlib.config.schema import ModelConfig, Precision, StudentConfig
from kdlib.models.loading import load_causal_lm, torch_dtype
from kdlib.models.pruning import prune_as_configured
from kdlib.models.transforms import TransformedStudent, apply_transforms
from kdlib.models.vocabulary import transfer_student_vocabulary
from kdlib.models.vlm import build_vlm, checkpoint_is_vision_language, is_vision_language, set_vision_trainable


def build_model(cfg: ModelConfig, device: torch.device, *, dtype: Optional[Precision] = None) -> nn.Module:
    """``cfg``'s model on ``device``, depth-pruned when ``cfg`` is a student config that asks for it
    (``student.prune`` loads the checkpoint pruned by importance, ``student.prune.output``)."""
    if checkpoint_is_vision_language(cfg):
        return build_vlm(cfg, device, dtype=dtype)
    pruned = isinstance(cfg, StudentConfig) and cfg.prune.output is not None
    model = load_causal_lm(cfg, device=device, location=cfg.prune.output if pruned else None)
    if isinstance(cfg, StudentConfig):
        prune_as_configured(model, cfg.keep_layers, cfg.num_layers)
        transfer_student_vocabulary(model, cfg)  # student.tokenizer with another vocabulary
    if dtype is not None:
        model.to(torch_dtype(dtype))
    return model


def build_student(cfg: StudentConfig, device: torch.device) -> TransformedStudent:
    """The student on ``device`` in training mode: loaded, pruned, then transformed (not sharded)."""
    model = build_model(cfg, device)
    if is_vision_language(model.config):
        set_vision_trainable(model, not cfg.freeze_vision)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    student = apply_transforms(model, cfg)
    student.model.train()
    return student
