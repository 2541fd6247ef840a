"""A frozen step's packed weights follow a sync once repacked, and the check that says so can fail.

``follows_weights`` is checked on a hand-made "compiled step" that reads a packed (transposed) copy
of a linear layer's weight: with the packing recorded it follows moved weights, without it it does
not; either way the weights come back bit for bit and the global generator is untouched. The last
test compiles a real frozen step with inductor (6 s) and checks what ``PackedWeights`` recorded.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from kdlib.backends.hf.decode.frozen import FROZEN_COMPILE_OPTIONS, PackedWeights, follows_weights, synced_tensors


def _layer() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(8, 4)


def _check(layer: nn.Linear, record_packing: bool) -> tuple[bool, PackedWeights, torch.Tensor]:
    packed_weight = layer.weight.detach().t().contiguous()  # what a compiled step would read
    packed = PackedWeights()
    if record_packing:
        packed.add(lambda: layer.weight.detach().t().contiguous(), packed_weight)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))

    def compiled_against_eager() -> float:
        step = x @ packed_weight + layer.bias
        eager = layer(x)
        return ((step - eager).abs().max() / eager.abs().max()).item()

    return follows_weights(layer, packed, compiled_against_eager, 1e-5), packed, packed_weight


@pytest.mark.parametrize("record_packing", [True, False])
def test_follows_weights_sees_a_stale_packed_copy(record_packing):
    layer = _layer()
    before = {name: t.detach().clone() for name, t in layer.state_dict().items()}
    rng = torch.get_rng_state()
    follows, _, packed_weight = _check(layer, record_packing)
    assert follows == record_packing
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, before[name])  # put back bit for bit
    assert torch.equal(packed_weight, before["weight"].t())  # and repacked from them
    assert torch.equal(torch.get_rng_state(), rng)  # the sampler's generator was not drawn from


def test_a_step_that_raises_with_moved_weights_does_not_follow():
    layer = _layer()
    before = {name: t.detach().clone() for name, t in layer.state_dict().items()}

    def failing_step() -> float:
        raise RuntimeError("inductor kernel failed (simulated)")

    assert not follows_weights(layer, PackedWeights(), failing_step, 1e-5)
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_refresh_packs_the_current_weights_in_place():
    layer = _layer()
    _, packed, packed_weight = _check(layer, record_packing=True)
    storage = packed_weight.data_ptr()
    with torch.no_grad():
        layer.weight.mul_(-2.0)
    packed.refresh()
    assert packed_weight.data_ptr() == storage and torch.equal(packed_weight, layer.weight.detach().t())


def test_synced_tensors_are_the_state_dicts_floats_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model.register_buffer("steps", torch.zeros((), dtype=torch.long))
    tied = nn.Module()
    tied.a = nn.Linear(4, 4, bias=False)
    tied.b = nn.Linear(4, 4, bias=False)
    tied.b.weight = tied.a.weight
    assert len(synced_tensors(model)) == 4  # 2 linear + 2 norm tensors; the integer buffer is not a weight
    assert len(synced_tensors(tied)) == 1


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor's CPU code needs a C++ compiler")
def test_inductor_packings_are_recorded_and_refreshed():
    """A frozen, compiled linear layer: inductor packs its weight; after a sync the refreshed step
    computes with the new weight, and without the refresh it would not."""
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    layer = nn.Linear(64, 96)
    x = torch.randn(4, 64)
    packed = PackedWeights()

    def frozen_linear(inputs):
        return layer(inputs)

    step = torch.compile(frozen_linear, dynamic=False)
    with torch.inference_mode(), inductor_config.patch(FROZEN_COMPILE_OPTIONS), packed.recording():
        torch.testing.assert_close(step(x), layer(x))
    assert len(packed) >= 1
    with torch.no_grad():
        layer.weight.add_(1.0)
    with torch.inference_mode(), inductor_config.patch(FROZEN_COMPILE_OPTIONS), packed.recording():
        stale = step(x)
        packed.refresh()
        fresh = step(x)
        expected = layer(x)
    assert not torch.allclose(stale, expected)
    torch.testing.assert_close(fresh, expected)
