"""The decode loop's draws: ``multinomial_draw`` is ``torch.multinomial`` token for token and leaves
the global generator where torch.multinomial leaves it; anything it does not cover goes to torch."""

from __future__ import annotations

import pytest
import torch

from kdlib.backends.hf.decode import sampling


def _probs(rows: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(rows, vocab, generator=generator) * 3, dim=-1)
    probs[:, torch.randperm(vocab, generator=generator)[: vocab // 3]] = 0  # what top-k / top-p leave
    return probs


@pytest.mark.parametrize(("rows", "vocab"), [(1, 50), (4, 49152), (3, 1001)])
def test_multinomial_draw_is_torch_multinomial(rows, vocab):
    assert sampling._reproduces_torch()  # this torch: the fast path is the one under test
    probs = _probs(rows, vocab, seed=vocab)
    for seed in range(12):
        torch.manual_seed(seed)
        torch.rand(seed * 53)  # start at various offsets of the generator's 624-word block
        start = torch.get_rng_state()
        expected = torch.multinomial(probs, 1).squeeze(1)
        expected_next = torch.rand(5)
        torch.set_rng_state(start)
        got = sampling.multinomial_draw(probs)
        assert torch.equal(got, expected), seed
        assert torch.equal(torch.rand(5), expected_next), seed  # the generator moved as torch moves it
    assert len(set(torch.stack([sampling.multinomial_draw(probs) for _ in range(8)]).flatten().tolist())) > 1


def test_draws_it_does_not_cover_go_to_torch(monkeypatch):
    probs = _probs(2, 300, seed=1)
    for case in (probs.double(), probs[0]):  # not float32; not [batch, V]
        torch.manual_seed(0)
        expected = torch.multinomial(case, 1).squeeze(-1)
        torch.manual_seed(0)
        assert torch.equal(sampling.multinomial_draw(case), expected)
    bad = probs.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(RuntimeError, match="probability tensor"):
        sampling.multinomial_draw(bad)  # torch's own error
    negative = probs.clone()
    negative[0, 0], negative[0, 1] = -0.01, negative[0, 1] + 0.01  # sums stay positive
    with pytest.raises(RuntimeError, match="probability tensor"):
        sampling.multinomial_draw(negative)
    monkeypatch.setattr(sampling, "_reproduces_torch", lambda: False)
    monkeypatch.setattr(sampling, "_exponential_like", lambda p: pytest.fail("fast path used"))
    torch.manual_seed(3)
    expected = torch.multinomial(probs, 1).squeeze(1)
    torch.manual_seed(3)
    assert torch.equal(sampling.multinomial_draw(probs), expected)


def test_self_check_restores_the_generator():
    sampling._reproduces_torch.cache_clear()
    torch.manual_seed(11)
    state = torch.get_rng_state()
    assert sampling._reproduces_torch()
    assert torch.equal(torch.get_rng_state(), state)
