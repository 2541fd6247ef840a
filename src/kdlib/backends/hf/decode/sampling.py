"""Token draws of kdlib's decode loop: ``generate``'s own draw, reproduced faster, and an inverse-CDF draw.

``generate`` samples with ``torch.multinomial(probs, 1)``, which on CPU is ``argmax(probs / q)``
with ``q`` one exponential variate per vocabulary entry, drawn serially from the global Mersenne
Twister, one serial draw per entry: for a 49k vocabulary a visible share of a compiled decode step
(docs/benchmarks.md#rollout-decode). :func:`multinomial_draw` draws the same variates from
the same generator state with numpy's MT19937 (the same algorithm, generated in bulk), transforms
them as torch does (a 53-bit uniform from two 32-bit words, ``-log1p(-u)``, rounded to float32),
moves torch's generator past them and takes the same argmax: the same tokens and the same
generator state afterwards, in less time (measured in docs/benchmarks.md). It depends on the layout of torch's CPU
generator state and on its exponential kernel, so it checks itself once per process against
``torch.multinomial`` (several generator states, one at a twist boundary) and otherwise, or for
any input it does not cover (not CPU float32 [batch, V]), calls ``torch.multinomial``. It reads and
writes the generator state around the draw, so another thread drawing from the global generator
at the same moment would be lost (the decode loop draws from one thread, as ``generate`` does).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

_STATE_WORDS = 624  # Mersenne Twister state (torch stores each word as uint64)
# torch's CPU generator state (CPUGeneratorImplStateLegacy): int64 seed, int32 left, int32 seeded,
# uint64 next, uint64 state[624], then the normal-sampling cache, which exponential draws leave alone
_LEFT, _NEXT, _KEY = slice(8, 12), slice(16, 24), slice(24, 24 + 8 * _STATE_WORDS)
_STATE_BYTES = 5056
_MANTISSA = (1 << 53) - 1


def multinomial_draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` [batch, V], exactly as ``torch.multinomial(probs, 1)`` draws it
    from the global generator (same tokens, same generator state after)."""
    if probs.device.type != "cpu" or probs.dtype != torch.float32 or probs.dim() != 2 or not _reproduces_torch():
        return torch.multinomial(probs, num_samples=1).squeeze(-1)
    total = probs.sum(-1)
    if not bool(torch.isfinite(total).all() and (total > 0).all() and probs.amin() >= 0):
        return torch.multinomial(probs, num_samples=1).squeeze(-1)  # raises torch's own error
    return torch.argmax(probs / _exponential_like(probs), dim=-1)


def inverse_cdf_draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs``: the first index whose float64 cumulative probability
    exceeds a uniform draw (zero-probability tokens have empty intervals and are never drawn)."""
    cdf = probs.to(torch.float64).cumsum(-1)
    uniform = torch.rand((probs.shape[0], 1), dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, uniform, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


SAMPLERS = {"multinomial": multinomial_draw, "inverse_cdf": inverse_cdf_draw}


def _exponential_like(probs: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(probs).exponential_()`` on the global CPU generator, generated with numpy."""
    state = torch.get_rng_state()
    words = state.numpy()
    bits = np.random.MT19937()
    # torch twists when ``left`` reaches 0 before a read; numpy when ``pos`` reaches 624
    bits.state = {"bit_generator": "MT19937",
                  "state": {"key": words[_KEY].view(np.uint64).astype(np.uint32), "pos": 625 - int(words[_LEFT].view(np.int32)[0])}}
    raw = np.random.Generator(bits).integers(0, 2**32, size=2 * probs.numel(), dtype=np.uint32)
    high, low = raw[0::2], raw[1::2]  # torch's random64(): the first word is the high half
    uniform = ((high & (_MANTISSA >> 32)).astype(np.float64) * 4294967296.0 + low) * (1.0 / (_MANTISSA + 1))
    variates = torch.from_numpy(uniform).neg_().log1p_().neg_().to(torch.float32).view_as(probs)
    moved = bits.state["state"]
    words[_KEY].view(np.uint64)[:] = moved["key"]
    words[_LEFT].view(np.int32)[0] = 625 - moved["pos"]
    words[_NEXT].view(np.uint64)[0] = moved["pos"]
    torch.set_rng_state(state)
    return variates


@functools.cache
def _reproduces_torch() -> bool:
    """Whether :func:`multinomial_draw` draws torch.multinomial's tokens and leaves the generator
    where it does, on this torch (checked once; the global generator is restored afterwards)."""
    saved = torch.get_rng_state()
    try:
        if saved.numel() != _STATE_BYTES:
            return False
        generator = torch.Generator().manual_seed(0)
        probs = torch.softmax(torch.randn(3, 2000, generator=generator) * 4, dim=-1)
        probs[:, ::7] = 0  # what top-k / top-p leave
        for seed, skip in ((0, 0), (1, 37), (2, 623), (3, 1000)):  # fresh, odd and even offsets
            torch.manual_seed(seed)
            torch.rand(skip)
            start = torch.get_rng_state()
            expected, after = torch.multinomial(probs, 1).squeeze(1), torch.get_rng_state()
            torch.set_rng_state(start)
            got = torch.argmax(probs / _exponential_like(probs), dim=-1)
            if not (torch.equal(got, expected) and torch.equal(torch.get_rng_state(), after)):
                log.info("rollout sampler: torch.multinomial's draw is not reproduced on torch %s; using it directly",
                         torch.__version__)
                return False
        return True
    except Exception as exc:  # noqa: BLE001 - any surprise means: use torch.multinomial
        log.info("rollout sampler: using torch.multinomial (%s)", exc)
        return False
    finally:
        torch.set_rng_state(saved)
