"""Optimizer and learning-rate schedule of the student: AdamW, linear warmup, cosine decay.

The schedule comes from transformers (cosine with a floor at ``min_lr_ratio * lr``); only the
parameter grouping (no weight decay on biases and norms; parameters under a given name prefix at
their own learning rate, such as DSKD's projectors) and AdamW's implementation are decided here.
torch picks the per-parameter loop on a CPU, which reads and writes every state tensor in its own
pass; the fused kernel does the whole update in one, several times faster on a CPU
(``benchmarks/optimizer.py``), so ``auto`` takes it wherever torch has it (settled when the config
is resolved, by :func:`fused_adamw_available`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdlib.config.models import Precision
from kdlib.config.training import AdamWImpl, TrainConfig

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fused_devices() -> list[str]:
    try:  # private, so a torch that moves it gets torch's default rather than an error
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return []
    return list(_get_fused_kernels_supported_devices())


def fused_adamw_available(device_type: str, dtype: Precision) -> bool:
    """Whether torch has fused AdamW kernels for parameters of ``dtype`` on ``device_type``."""
    torch_dtype = {Precision.bfloat16: torch.bfloat16, Precision.float32: torch.float32}.get(Precision(dtype))
    return device_type in _fused_devices() and torch_dtype in _FUSED_DTYPES


def adamw_kwargs(impl: AdamWImpl | str, params: list[nn.Parameter]) -> dict[str, bool]:
    """torch.optim.AdamW's ``fused``/``foreach`` switches for ``impl`` (``auto``: fused when torch has
    the kernel for every parameter's device and dtype, else torch's default)."""
    try:
        impl = AdamWImpl(impl)
    except ValueError:
        raise ValueError(f"adamw_impl: expected one of {', '.join(i.value for i in AdamWImpl)}, got {impl!r}") from None
    if impl is AdamWImpl.auto:
        devices = _fused_devices()
        fusable = bool(devices) and all(p.device.type in devices and p.dtype in _FUSED_DTYPES for p in params)
        return {"fused": True} if fusable else {}
    return {AdamWImpl.fused: {"fused": True}, AdamWImpl.foreach: {"foreach": True},
            AdamWImpl.for_loop: {"foreach": False}, AdamWImpl.default: {}}[impl]


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, lr_by_prefix: Optional[dict[str, Optional[float]]] = None
) -> torch.optim.Optimizer:
    """AdamW over ``model``'s trainable parameters; those whose name starts with a key of
    ``lr_by_prefix`` get that learning rate (None: ``cfg.lr``) in a group of their own."""
    own_lr = {prefix: lr for prefix, lr in (lr_by_prefix or {}).items() if lr is not None}
    decay, no_decay = [], []
    special: dict[str, list[nn.Parameter]] = {prefix: [] for prefix in own_lr}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        prefix = next((p for p in own_lr if name.startswith(p)), None)
        if prefix is not None:
            special[prefix].append(param)
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        *({"params": params, "lr": own_lr[prefix], "weight_decay": cfg.weight_decay} for prefix, params in special.items()),
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        **adamw_kwargs(cfg.adamw_impl, [p for g in groups for p in g["params"]]),
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    warmup = int(round(cfg.warmup_ratio * total_steps))
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=max(total_steps, 1),
        min_lr_rate=cfg.min_lr_ratio,
    )
