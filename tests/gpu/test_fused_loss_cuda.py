"""The fused, chunked KD + CE loss on CUDA against a float64 reference: values and gradients
(marker `gpu`). Not run yet: no GPU was available (docs/gpu.md)."""

from __future__ import annotations

import pytest
import torch

from kdlib.losses import fused_kd_loss

pytestmark = pytest.mark.gpu

# float32 accumulates in float32 over chunks; bf16 rounds the logits as the model does (the CPU
# tests' documented bf16 tolerances, tests/unit/test_fused_loss.py).
TOLERANCE = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (5e-3, 3e-2)}  # (value, gradient) relative


def _reference(loss, hs, ws, ht, wt, targets, beta=0.5):
    """sum over tokens of KD(p_teacher, q_student) + CE, in float64 with autograd."""
    vocab = min(ws.shape[0], wt.shape[0])
    zs, zt = hs @ ws.T, ht @ wt.T
    log_q, log_p = torch.log_softmax(zs[:, :vocab], -1), torch.log_softmax(zt[:, :vocab], -1)
    p, q = log_p.exp(), log_q.exp()
    if loss == "kl":
        kd = (p * (log_p - log_q)).sum(-1)
    elif loss == "rkl":
        kd = (q * (log_q - log_p)).sum(-1)
    else:  # jsd with mixture weight beta: beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q
        log_m = torch.log(beta * p + (1 - beta) * q)
        kd = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    ce = torch.nn.functional.cross_entropy(zs, targets, reduction="none")
    return (kd + ce).sum()


@pytest.mark.parametrize("loss, params", [("kl", {}), ("rkl", {}), ("jsd", {"beta": 0.5})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_and_gradients_on_cuda_match_float64(loss, params, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, hidden, vs, vt = 1000, 512, 32064, 32000  # vocabularies differ: the common part is compared
    hs = torch.randn(n, hidden, device="cuda", generator=g)
    ws = torch.randn(vs, hidden, device="cuda", generator=g) * 0.05
    ht = torch.randn(n, hidden, device="cuda", generator=g)
    wt = torch.randn(vt, hidden, device="cuda", generator=g) * 0.05
    targets = torch.randint(0, vs, (n,), device="cuda", generator=g)

    # the reference sees the inputs rounded to dtype, as the fused path does
    ref_hs, ref_ws = hs.to(dtype).double().requires_grad_(), ws.to(dtype).double().requires_grad_()
    reference = _reference(loss, ref_hs, ref_ws, ht.to(dtype).double(), wt.to(dtype).double(), targets, **params)
    reference.backward()

    got_hs, got_ws = hs.to(dtype).requires_grad_(), ws.to(dtype).requires_grad_()
    got = fused_kd_loss(got_hs, got_ws, ht.to(dtype), wt.to(dtype), loss=loss, chunk_size=256, targets=targets,
                        **params)
    got.backward()
    value_tol, grad_tol = TOLERANCE[dtype]
    assert got.item() == pytest.approx(reference.item(), rel=value_tol)
    for name, a, b in (("hidden", got_hs.grad, ref_hs.grad), ("head", got_ws.grad, ref_ws.grad)):
        error = (a.double() - b).abs().max().item() / b.abs().max().item()
        assert error < grad_tol, (name, error)
