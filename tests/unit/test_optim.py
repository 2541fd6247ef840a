"""AdamW's implementation switch: ``auto`` takes torch's fused kernel where it exists, and every
implementation makes the same update as torch's per-parameter loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlib.config import TrainConfig
from kdlib.optim import adamw_kwargs, build_optimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def test_auto_fuses_on_the_cpu_and_keeps_torchs_default_where_there_is_no_kernel():
    assert adamw_kwargs("auto", list(_model().parameters())) == {"fused": True}
    on_meta = [nn.Parameter(torch.empty(3, device="meta"))]
    assert adamw_kwargs("auto", on_meta) == {}
    assert build_optimizer(_model(), TrainConfig()).defaults["fused"] is True
    assert build_optimizer(_model(), TrainConfig(adamw_impl="for_loop")).defaults["foreach"] is False
    with pytest.raises(ValueError, match="adamw_impl: expected one of auto, fused"):
        adamw_kwargs("apex", on_meta)


@pytest.mark.parametrize("impl", ["auto", "fused", "foreach"])
def test_every_implementation_makes_the_loops_update(impl):
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    models = {name: _model().double() for name in (impl, "for_loop")}
    optimizers = {name: build_optimizer(m, TrainConfig(**{**vars(cfg), "adamw_impl": name})) for name, m in models.items()}
    data = torch.randn(16, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for name, model in models.items():
            optimizers[name].zero_grad()
            model(data).square().mean().backward()
            optimizers[name].step()
    for (key, a), (_, b) in zip(models[impl].state_dict().items(), models["for_loop"].state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=key)
    # the update moved the weights (the comparison is not between two untouched models)
    assert not torch.allclose(models[impl][0].weight, _model().double()[0].weight)
