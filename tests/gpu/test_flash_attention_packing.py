"""FlashAttention-2 with packing: a packed micro-batch (variable-length attention from the position
ids) gives the padded micro-batch's hidden states at every loss position (marker `gpu`; needs
flash-attn: kdlib[gpu]). Not run yet: no GPU was available (docs/gpu.md)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _hidden_at_loss_positions(overrides: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) final hidden states at the loss positions of the first global batch,
    float32 on the CPU, in (sample, position) order whatever the layout."""
    import kdlib
    from kdlib.models.forward import hidden_at_loss_positions
    from kdlib.runner import built

    with built(kdlib.compose(overrides)) as loop:
        pipeline = loop.pipeline
        samples = next(loop.sample_batches())
        _, batches = pipeline.data.step_batches(samples, pipeline.cfg.train, 1)
        student = pipeline.students.group.workers[0].model
        teacher = pipeline.teacher.group.workers[0].backend.model
        with torch.no_grad():
            s = torch.cat([hidden_at_loss_positions(student, b.student.to("cuda")).float().cpu() for b in batches])
            t = torch.cat([hidden_at_loss_positions(teacher, b.teacher_view.to("cuda")).float().cpu() for b in batches])
    return s, t


def test_packed_flash_attention_equals_padded(tiny_overrides):
    pytest.importorskip("flash_attn")
    base = [o for o in tiny_overrides if not o.startswith(("device=", "teacher.dtype="))] + [
        "device=cuda", "teacher.dtype=bfloat16", "student.dtype=bfloat16", "eval.before=false",
        "train.global_batch_size=8", "train.micro_batch_size=8",
    ]
    flash = base + ["student.attn_implementation=flash_attention_2", "teacher.attn_implementation=flash_attention_2"]
    padded = _hidden_at_loss_positions(flash + ["train.packing=false"])
    packed = _hidden_at_loss_positions(flash + ["train.packing=true"])
    reference = _hidden_at_loss_positions(base + ["train.packing=false"])  # sdpa, padded
    for got, want in zip(packed + padded, reference + reference):
        assert got.shape == want.shape and got.shape[0] > 0
        # bf16 kernels that sum in different orders: agreement to bf16's resolution at the states' scale
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * float(want.abs().max()))
    # packing changes nothing about which positions are trained or what they see
    torch.testing.assert_close(packed[0], padded[0], rtol=0, atol=2e-2 * float(padded[0].abs().max()))
