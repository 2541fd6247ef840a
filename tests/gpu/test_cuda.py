"""GPU path: bf16 fused loss, colocation sleep/wake (marker `gpu`, skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_fused_loss_bf16_on_cuda_matches_fp32_reference():
    from kdlib.losses import fused_kd_loss

    g = torch.Generator(device="cuda").manual_seed(0)
    n, h, v = 512, 256, 32000
    hs = torch.randn(n, h, device="cuda", generator=g)
    ws = torch.randn(v, h, device="cuda", generator=g) * 0.05
    ht = torch.randn(n, h, device="cuda", generator=g)
    wt = torch.randn(v, h, device="cuda", generator=g) * 0.05
    ref = fused_kd_loss(hs.double(), ws.double(), ht.double(), wt.double(), loss="jsd", chunk_size=128)
    got = fused_kd_loss(hs.bfloat16(), ws.bfloat16().requires_grad_(), ht.bfloat16(), wt.bfloat16(), loss="jsd", chunk_size=128)
    assert got.item() == pytest.approx(ref.item(), rel=2e-2)
    got.backward()


def test_colocated_teacher_and_student_free_the_gpu(tiny_llama):
    import kdlib
    from kdlib.config import TeacherConfig, TransportConfig
    from kdlib.workers.specs import TeacherSpec
    from kdlib.workers.teacher import TeacherWorker

    worker = TeacherWorker(TeacherSpec(TeacherConfig(model=str(tiny_llama)), TransportConfig(name="inprocess"), "cuda"))
    loaded = torch.cuda.memory_allocated()
    worker.sleep()
    assert torch.cuda.memory_allocated() < loaded
    assert next(worker.backend.model.parameters()).device.type == "cpu"
    worker.wake()
    assert next(worker.backend.model.parameters()).device.type == "cuda"
    assert kdlib is not None


def test_student_optimizer_state_leaves_the_gpu(tiny_overrides):
    import kdlib
    from kdlib.pipeline import Pipeline

    cfg = kdlib.compose([o for o in tiny_overrides if not o.startswith("device=")] + ["device=cuda", "eval.before=false"])
    with Pipeline.from_config(cfg, run_dir=None) as pipeline:

        loop = pipeline.mode
        loop.step(next(loop.sample_batches()))
        worker = pipeline.student.workers[0]
        worker.sleep()
        states = [t for s in worker.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
        assert states and all(t.device.type == "cpu" for t in states)
        worker.wake()
        assert all(t.device.type == "cuda" for s in worker.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
