"""Ray equals local on image+text runs: a teacher actor and two FSDP2 student actors (vision blocks
sharded; one rank's micro-batch has no image while the other's has), micro-batches crossing
processes with image references, hidden states through the object store."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

import kdlib
from kdlib.config import StudentConfig
from kdlib.models.vlm import build_vlm, vision_parameters

pytestmark = pytest.mark.ray


def _rows(result) -> list[dict]:
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family, vision_mode", [("idefics3", "frozen"), ("gemma3", "trainable")])
def test_ray_fsdp_vlm_run_reproduces_the_local_run(vlm_overrides, tmp_path, family, vision_mode):
    """Unshuffled global batches of 2 in micro-batches of 1: rank 0 trains sample 2k, rank 1 sample
    2k+1, and the data alternates chats with and without pictures, so at step 2 one rank has a
    text-only micro-batch while the other runs its vision tower (the idle pass keeps the vision
    blocks' collectives in step). Trainable vision: its gradients are reduced across ranks too."""
    common = vlm_overrides(family) + [
        "data.shuffle=false", "train.global_batch_size=2", "train.micro_batch_size=1", "eval.before=false",
        f"student.freeze_vision={vision_mode == 'frozen'}",
    ]
    local = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'local'}"]))
    on_ray = kdlib.run(kdlib.compose(common + [  # the launcher starts a local cluster and stops it after
        "launcher=ray", "launcher.num_cpus=2", "transport=ray", "student.num_workers=2", f"output_dir={tmp_path / 'ray'}",
    ]))
    a, b = _rows(local), _rows(on_ray)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5), key
    assert on_ray.eval_after["kl"] == pytest.approx(local.eval_after["kl"], rel=1e-5)
    # the students gathered from the FSDP2 shards and saved load as the local one, parameter by parameter
    saved_local = AutoModelForImageTextToText.from_pretrained(local.student_dir)
    saved_ray = dict(AutoModelForImageTextToText.from_pretrained(on_ray.student_dir).named_parameters())
    for name, param in saved_local.named_parameters():
        # an attention key bias has a gradient of exactly 0 in exact arithmetic (softmax ignores a
        # shift shared by a row's logits); AdamW turns its rounding noise (which depends on the
        # order of sums, so on sharding) into steps of up to lr: it is compared at that scale
        atol = 1e-4 if name.endswith("k_proj.bias") else 1e-6
        torch.testing.assert_close(saved_ray[name], param, rtol=1e-4, atol=atol)
    # the trainable vision side moved (alike on both launchers); the frozen one did not
    student = next(o.split("=", 1)[1] for o in common if o.startswith("student.model="))
    initial = dict(vision_parameters(build_vlm(StudentConfig(model=student, num_layers=2), torch.device("cpu"))))
    vision = dict(vision_parameters(saved_local))
    assert vision and set(vision) == set(initial)
    moved = [name for name in vision if not torch.equal(vision[name], initial[name])]
    assert (moved == []) if vision_mode == "frozen" else len(moved) > len(vision) // 2
