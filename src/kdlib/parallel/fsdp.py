"""FSDP2 for the student: one ``fully_shard`` per decoder layer and one at the root.

The root is the :class:`~kdlib.algorithms.objective.StudentObjective` (student model + algorithm),
so the parameters outside the decoder layers (embeddings, final norm, head) are gathered for the
whole loss computation, which uses the head weight directly. Gradients are summed over ranks, not
averaged: the loss is already divided by the loss tokens of the whole global batch.

A vision-language student also gets one unit per vision block (:func:`kdlib.models.vlm.vision_blocks`;
frozen or trainable, FSDP2 shards per parameter); its projector stays in the root. Every rank runs
the vision tower on every micro-batch (an idle pass on a blank image when it has no image), so the
ranks' collectives stay in the same order.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlib.config.schema import FSDPConfig
from kdlib.models.head import decoder_of


def device_mesh(world_size: int, shard_size: int, device_type: str):
    """A 1-D mesh (FSDP) or a 2-D replicate x shard mesh (HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh

    if shard_size in (-1, world_size):
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    if shard_size < 1 or world_size % shard_size:
        raise ValueError(f"student.fsdp.shard_size={shard_size} must divide student.num_workers={world_size}")
    return init_device_mesh(
        device_type, (world_size // shard_size, shard_size), mesh_dim_names=("replicate", "shard")
    )


def shard_student(objective: nn.Module, model: nn.Module, cfg: FSDPConfig, world_size: int, device: torch.device) -> None:
    """Apply FSDP2 to ``objective`` (whose ``model`` is the transformers student), in place."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from kdlib.models.loading import torch_dtype

    if cfg.cpu_offload and device.type != "cuda":
        from kdlib.errors import ConfigError

        raise ConfigError("student.fsdp.cpu_offload needs a CUDA device (on the CPU the parameters already live in host memory)")
    mesh = device_mesh(world_size, cfg.shard_size, device.type)
    options = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(
            param_dtype=None if cfg.param_dtype is None else torch_dtype(cfg.param_dtype),
            reduce_dtype=torch_dtype(cfg.reduce_dtype),
        ),
        offload_policy=CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy(),
    )
    from kdlib.models.vlm import is_vision_language, vision_blocks

    blocks = list(decoder_of(model).layers)
    if is_vision_language(model.config):
        blocks = vision_blocks(model) + blocks
    for block in blocks:
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, **options)
    fully_shard(objective, **options)
    for module in objective.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum over ranks
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
