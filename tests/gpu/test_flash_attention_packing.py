"""FlashAttention-2 with packing: a packed micro-batch (variable-length attention from the
position ids) gives the padded micro-batch's loss (marker `gpu`; needs flash-attn: kdlib[gpu]).
Not run yet: no GPU was available (docs/gpu.md)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


def _first_step_loss(overrides: list[str]) -> float:
    import kdlib
    from kdlib.runner import built

    cfg = kdlib.compose(overrides)
    with built(cfg, run_dir=None) as loop:
        return loop.step(next(loop.sample_batches()))["loss"]


def test_packed_flash_attention_equals_padded(tiny_overrides):
    pytest.importorskip("flash_attn")
    base = [o for o in tiny_overrides if not o.startswith(("device=", "teacher.dtype="))] + [
        "device=cuda", "teacher.dtype=bfloat16", "student.dtype=bfloat16", "eval.before=false",
        "train.global_batch_size=8", "train.micro_batch_size=8",
    ]
    flash = base + ["student.attn_implementation=flash_attention_2", "teacher.attn_implementation=flash_attention_2"]
    padded = _first_step_loss(flash + ["train.packing=false"])
    packed = _first_step_loss(flash + ["train.packing=true"])
    reference = _first_step_loss(base + ["train.packing=false"])  # sdpa, padded
    assert packed == pytest.approx(padded, rel=1e-2)
    assert packed == pytest.approx(reference, rel=1e-2)
