"""kdlib's decode engine: transformers' ``generate`` preparation, a lean decode loop of its own.

Plain ``model.generate`` spends most of a small model's decode step outside the arithmetic it
needs: a dynamic KV cache that grows by concatenation, per-step input preparation, and, on CPU,
an output-head product (``[batch, hidden] x [vocab, hidden]^T``) that MKL runs at a quarter of the
memory bandwidth when it is laid out as ``nn.Linear`` lays it out. This engine keeps everything
``generate`` decides (generation config merged with the model's defaults, logits processors in
their order, stopping criteria, position ids) by running ``generate`` itself with a callable
``custom_generate`` (transformers' documented hook for replacing the decoding loop), and replaces
only the loop: a pre-allocated :class:`transformers.StaticCache` kept across calls, one batched
prefill, the head as ``weight @ hidden^T`` (same dot products, faster on CPU), and the next
token chosen exactly as ``generate``'s sampling loop chooses it (processors, softmax,
``torch.multinomial``'s draw on the global generator, reproduced faster by
:mod:`kdlib.backends.hf.decode.sampling`, so the same seed draws the same tokens). The decode
step can be compiled with ``torch.compile`` (inductor); parameters are graph inputs, so weights
copied in place at sync are the ones the next call uses. Compiled with frozen weights
(``freeze=True``), inductor folds the weights into the step as constants and its C++ GEMM kernels
pack them once: on CPU the few-row products then stream the weights at close to the memory
bandwidth (the fastest steps kdlib measured; docs/benchmarks.md). The step then reads packed copies, not the
parameters, so a weight sync repacks them in place (:mod:`kdlib.backends.hf.decode.frozen`,
:meth:`DecodeEngine.weights_changed`).
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from kdlib.backends.hf.decode.products import FewRowLinears, head_logits
from kdlib.errors import first_line
from kdlib.progress import phase
from kdlib.models.head import LMHead, decoder_of, lm_head_of, verify_lm_head
from kdlib.backends.hf.decode.frozen import FROZEN_COMPILE_OPTIONS, PackedWeights, follows_weights
from kdlib.backends.hf.decode.sampling import SAMPLERS

log = logging.getLogger(__name__)

# Cache lengths are rounded up to a multiple of these. Attention reads the whole cache, so eager
# decoding keeps it tight; a compiled step is specialised to the cache length, so its cache only
# grows, in large steps: prompts of varying lengths reuse one cache and one compiled graph.
EAGER_CAPACITY_STEP = 32
COMPILED_CAPACITY_STEP = 256
# Caches kept (one per batch size and length) before the oldest are dropped.
MAX_CACHES = 8


@dataclass
class Decoded:
    """What one decode call returns: generate's ``sequences`` and, if asked, sampling log-probs."""

    sequences: torch.Tensor  # [batch, prompt + generated], pad after a row's stop token
    # [batch, generated]: log-probability of each chosen token under the temperature-scaled
    # distribution, before top-p truncation (kdlib.backends.Generation.logprobs; None unless asked for).
    logprobs: Optional[torch.Tensor] = None


class EngineUnsupported(RuntimeError):
    """The model cannot run on this engine (the message says why); callers fall back to generate."""


class _CompileFailure(RuntimeError):
    """The first compiled decode step of a shape raised or disagreed with eager (the cause is chained)."""


class DecodeEngine:
    """A static-cache decode loop around one causal LM, kept alive across ``generate`` calls."""

    def __init__(self, model: nn.Module, *, compile: bool = False, freeze: bool = False) -> None:
        self.model = model
        self.decoder = decoder_of(model)
        self.head: LMHead = lm_head_of(model)
        # float32 on CPU: few-row products as weight @ x^T where MKL streams the weight faster; a
        # frozen step keeps x @ weight^T, the form whose weights inductor's GEMM template packs
        # (the transposed form is slower there: docs/benchmarks.md#rollout-decode)
        self.transposed_products = (
            not freeze and self.head.weight.device.type == "cpu" and self.head.weight.dtype == torch.float32
        )
        self._linears = FewRowLinears(self.decoder, transposed=self.transposed_products)
        self.compiled = compile or freeze
        self.frozen = freeze
        self._caches: dict[tuple[int, int], object] = {}  # (batch size, length) -> StaticCache
        self._capacity = 0  # length of the cache of the current (or last) call
        # rows the step computes: a compiled step keeps the largest batch it has seen, and a smaller
        # batch (the last prompts of an epoch) runs in it with copies of its first row, which are
        # computed and ignored, instead of compiling the step for another shape (tens of seconds)
        self._rows = 0
        self._step: Callable = self._compiled_step() if self.compiled else self._forward
        self._verified: set[tuple[int, int]] = set()  # (batch, cache length) the compiled step passed
        self._packed = PackedWeights()  # what a frozen step's compiles packed
        self._repacks = True  # a frozen step follows a sync once repacked (checked per compiled shape)
        self._repack_due = False  # weights changed since the last repack (done once, at the next call)

    def _compiled_step(self) -> Callable:
        if not self.frozen:
            return torch.compile(self._forward, dynamic=False)
        step = torch.compile(self._frozen_forward, dynamic=False)
        from torch._inductor import config as inductor_config

        def frozen_step(*args):
            # set while dynamo traces, not only while inductor compiles: dynamo decides then to make
            # the parameters attributes of the graph, which freezing can fold (torch.compile's
            # options= patches inductor's config too late: the weights are then not folded)
            with inductor_config.patch(FROZEN_COMPILE_OPTIONS), self._packed.recording():
                return step(*args)

        return frozen_step

    def reserve(self, length: int) -> None:
        """Calls will need up to ``length`` positions (longest prompt + new tokens). A compiled
        step is specialised to its cache length, so its cache is sized for them from the start:
        one compile instead of another each time a longer prompt grows the cache (tens of seconds
        each). Eager caches stay tight (attention reads the whole cache)."""
        if self.compiled:
            self._capacity = max(self._capacity, _round_up(length, COMPILED_CAPACITY_STEP))

    def weights_changed(self) -> None:
        """The model's weights were overwritten in place (a weight sync, possibly one of several
        buckets). A frozen step reads packed copies of the old ones: they are packed again in place
        at the next call, once for all buckets, or, if the step did not follow moved weights when
        it was checked, the step is dropped and the next call compiles again (and checks the new
        step against eager). Other engines read the parameters and need nothing."""
        if not self.frozen:  # a frozen engine whose compile failed is no longer frozen
            return
        if self._repacks:
            self._repack_due = True
            return
        torch.compiler.reset()  # dynamo's guards do not see in-place changes of frozen weights
        self._step = self._compiled_step()
        self._packed = PackedWeights()
        self._verified.clear()

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **generate_kwargs) -> Decoded:
        """``model.generate(input_ids, attention_mask, **generate_kwargs)`` on this engine's loop.

        ``generate_kwargs`` are generate's own (``max_new_tokens``, ``do_sample``, ``temperature``,
        ``top_p``, ``top_k``, ``eos_token_id``, ``pad_token_id``) plus the loop's own ``sampler``
        (a key of :data:`SAMPLERS`) and ``record_logprobs``. A
        compiled step is checked against the eager step at its first call for each shape; a compile
        failure or a disagreement is logged once and the engine continues eagerly; the call is
        redone from the same random state, so it samples what it would have sampled.
        """
        if self._repack_due:
            self._packed.refresh()
            self._repack_due = False
        self._rows = max(self._rows, input_ids.shape[0]) if self.compiled else input_ids.shape[0]
        cache = self._cache_for(self._rows, input_ids.shape[1] + generate_kwargs["max_new_tokens"])
        rng = torch.get_rng_state()
        try:
            with self.lean_products():
                return self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                    custom_generate=self._decode_loop, **generate_kwargs,
                )
        except _CompileFailure as failure:
            log.warning("rollout engine: the torch.compile'd decode step failed (%s); decoding eagerly",
                        f"{type(failure.__cause__).__name__}: {first_line(failure.__cause__)}")
            self.compiled = self.frozen = False
            self._step = self._forward
            torch.set_rng_state(rng)
            return self.decode(input_ids, attention_mask, **generate_kwargs)

    def lean_products(self) -> "FewRowLinears":
        """A context in which the decoder's few-row products are 2D, in the faster orientation."""
        return self._linears

    @torch.inference_mode()
    def forward_logits(self, ids: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """float32 logits at the last position of ``ids``, through ``cache`` (eager)."""
        return self._forward(ids, position, mask, cache)

    # ------------------------------------------------------------------ the loop
    def _decode_loop(
        self, model, input_ids, logits_processor, stopping_criteria, generation_config,
        synced_gpus: bool = False, streamer=None, record_logprobs: bool = False, sampler: str = "multinomial",
        **model_kwargs,
    ) -> Decoded:
        """generate's sampling loop (``GenerationMixin._sample``) with a lean forward."""
        if synced_gpus or streamer is not None:
            raise EngineUnsupported("synced_gpus and streamers are not supported by the rollout engine")
        cache = model_kwargs["cache"]
        position = model_kwargs.get("position_ids")
        if position is None:
            raise EngineUnsupported(f"{type(model).__name__}.forward takes no position_ids")
        batch, prompt_len = input_ids.shape
        total = generation_config.max_length
        pad = generation_config._pad_token_tensor
        sequence = torch.full((batch, total), int(pad), dtype=input_ids.dtype, device=input_ids.device)
        sequence[:, :prompt_len] = input_ids
        # the 2D mask over the whole cache: the prompt's own mask, then 1 for each decoded position
        mask = torch.zeros((self._rows, self._capacity), dtype=torch.long, device=input_ids.device)
        attention = model_kwargs.get("attention_mask")  # generate drops it when nothing is padded
        mask[:batch, :prompt_len] = 1 if attention is None else attention
        mask[batch:] = mask[0]  # rows beyond the batch (see _rows) repeat its first row
        widen = functools.partial(_repeat_first_row, rows=self._rows)
        logprobs = torch.zeros((batch, total - prompt_len), device=input_ids.device) if record_logprobs else None
        unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
        draw = SAMPLERS[sampler]
        temperature = float(generation_config.temperature or 1.0) if generation_config.do_sample else 1.0

        logits = self._forward(widen(input_ids), widen(position), mask, cache)[:batch]  # batched prefill, eager
        next_position = widen(position[:, -1:] + 1)
        length = prompt_len
        while True:
            scores = logits_processor(sequence[:, :length], logits)
            if generation_config.do_sample:
                tokens = draw(nn.functional.softmax(scores, dim=-1))
            else:
                tokens = torch.argmax(scores, dim=-1)
            if logprobs is not None:
                logprobs[:, length - prompt_len] = token_logprobs(logits, tokens, temperature)
            tokens = tokens * unfinished + pad * (1 - unfinished)
            sequence[:, length] = tokens
            length += 1
            unfinished = unfinished & ~stopping_criteria(sequence[:, :length], scores)
            if unfinished.max() == 0:  # max_length is one of the stopping criteria
                break
            mask[:, length - 1] = 1
            logits = self._decode_step(widen(tokens[:, None]), next_position, mask, cache)[:batch]
            next_position = next_position + 1
        return Decoded(sequence[:, :length], None if logprobs is None else logprobs[:, : length - prompt_len])

    def _decode_step(self, ids: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        if not self.compiled:
            return self._step(ids, position, mask, cache)
        # (re)compiling must not draw from the generator the sampler uses
        with torch.random.fork_rng(devices=[ids.device] if ids.device.type != "cpu" else [],
                                   device_type=ids.device.type if ids.device.type != "cpu" else "cuda"):
            shape = (ids.shape[0], mask.shape[1])
            if shape in self._verified:
                return self._step(ids, position, mask, cache)
            # the first call of a shape compiles: a failure or a wrong result is the compiler's
            try:
                with phase(f"rollout engine: compiling the decode step for {shape[0]} rows x {shape[1]} positions "
                           "(once per shape; tens of seconds on CPU)"):
                    logits = self._step(ids, position, mask, cache)
            except Exception as exc:  # noqa: BLE001
                raise _CompileFailure() from exc
            err = _relative_error(logits, self._redo_eagerly(ids, position, mask, cache))
            if not err <= _rtol(self.head.weight.dtype):
                raise _CompileFailure() from ArithmeticError(
                    f"the compiled decode step disagrees with the eager one (max error {err:.3g} of the logit scale)")
            if self.frozen and self._repacks:
                self._repacks = self._follows_weights(ids, position, mask, cache)
        self._verified.add(shape)
        return logits

    def _follows_weights(self, ids: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, cache) -> bool:
        """Whether this shape's frozen step, repacked, computes with moved weights (the step is redone
        at the cache slot it wrote; the slot is rewritten with the real weights afterwards)."""

        def compiled_against_eager() -> float:
            cache.crop(-1)
            moved = self._step(ids, position, mask, cache)
            return _relative_error(moved, self._redo_eagerly(ids, position, mask, cache))

        follows = follows_weights(self.model, self._packed, compiled_against_eager, _rtol(self.head.weight.dtype))
        self._redo_eagerly(ids, position, mask, cache)
        return follows

    def _redo_eagerly(self, ids: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """The last step redone eagerly: it rewrites the cache slot that step wrote."""
        cache.crop(-1)
        return self._forward(ids, position, mask, cache)

    def _frozen_forward(self, ids: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """:meth:`_forward` under a code object of its own: dynamo keeps compiled graphs per code
        object, and a graph compiled without freezing (another engine's) must not serve a frozen step."""
        return self._forward(ids, position, mask, cache)

    def _forward(self, ids: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        hidden = self.decoder(
            input_ids=ids, attention_mask=mask, position_ids=position, cache=cache, use_cache=True
        ).last_hidden_state[:, -1]
        return head_logits(self.head, hidden, transposed=self.transposed_products)

    # ------------------------------------------------------------------ caches
    def _cache_for(self, batch: int, length: int):
        """A reset static cache for ``batch`` rows of at least ``length`` positions (kept for reuse)."""
        from transformers import StaticCache

        if self.compiled:
            capacity = max(self._capacity, _round_up(length, COMPILED_CAPACITY_STEP))
        else:
            capacity = _round_up(length, EAGER_CAPACITY_STEP)
        cache = self._caches.pop((batch, capacity), None)
        if cache is None:
            cache = StaticCache(config=self.model.config, max_cache_len=capacity)
        self._caches[(batch, capacity)] = cache  # most recently used last
        while len(self._caches) > MAX_CACHES:
            del self._caches[next(iter(self._caches))]
        cache.reset()
        self._capacity = capacity
        return cache


def _repeat_first_row(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` [batch, ...] with copies of its first row appended up to ``rows`` rows."""
    extra = rows - t.shape[0]
    return t if extra <= 0 else torch.cat([t, t[:1].expand(extra, *t.shape[1:])])


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def build_engine(model: nn.Module, *, compile: bool, freeze: bool = False) -> DecodeEngine:
    """An engine for ``model``, or :class:`EngineUnsupported` saying why this model cannot use it.

    Checks that the head reproduces the model's logits (kdlib's head identity) and that decoding
    through the static cache, with left padding, gives the model's own full-forward logits.
    """
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise EngineUnsupported(f"{type(model).__name__}.forward takes no position_ids")
    try:
        engine = DecodeEngine(model, compile=compile, freeze=freeze)
        verify_lm_head(model, engine.head)
        _probe_cache_path(engine)
    except EngineUnsupported:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means "use plain generate"
        raise EngineUnsupported(f"{type(model).__name__}: {first_line(exc)}") from exc
    return engine


@torch.inference_mode()
def _probe_cache_path(engine: DecodeEngine, *, prompt_len: int = 6, steps: int = 3) -> None:
    """Prefill + decode of a left-padded probe batch against the model's full forward."""
    model = engine.model
    device = engine.head.weight.device
    rtol = _rtol(engine.head.weight.dtype)
    vocab = engine.head.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, prompt_len + steps), generator=generator).to(device)
    attention = torch.ones_like(ids)
    attention[1, :2] = 0  # row 1 is left-padded by two positions
    reference = model(input_ids=ids, attention_mask=attention, position_ids=_positions(attention)).logits.float()
    cache = engine._cache_for(2, ids.shape[1])
    mask = torch.zeros((2, engine._capacity), dtype=torch.long, device=device)
    mask[:, :prompt_len] = attention[:, :prompt_len]
    position = _positions(attention)
    with engine.lean_products():
        got = [engine.forward_logits(ids[:, :prompt_len], position[:, :prompt_len], mask, cache)]
        for t in range(prompt_len, prompt_len + steps - 1):
            mask[:, t] = 1
            got.append(engine.forward_logits(ids[:, t : t + 1], position[:, t : t + 1], mask, cache))
    got_logits = torch.stack(got, dim=1)
    expected = reference[:, prompt_len - 1 : prompt_len + steps - 1]
    err = (got_logits - expected).abs().max().item()
    scale = expected.abs().max().item() + 1e-6
    if not err <= rtol * scale:
        raise EngineUnsupported(
            f"{type(model).__name__}: decoding through a static KV cache does not reproduce the full "
            f"forward (max abs error {err:.3g} vs logit scale {scale:.3g})"
        )
    engine._caches.clear()


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference of two sets of logits, relative to the largest expected logit."""
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _rtol(dtype: torch.dtype) -> float:
    """Agreement expected between two float orders of the same logits, relative to their scale:
    float32 agrees to rounding (~1e-6 of the logit scale), half types to their own precision."""
    return 1e-4 if dtype == torch.float32 else 2e-2


def _positions(attention: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as generate computes them."""
    return (attention.long().cumsum(-1) - 1).masked_fill(attention == 0, 0)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[token] per row, in float32: the log-probability a rollout
    engine reports for each sampled token (before top-p truncation: see kdlib.backends.Generation)."""
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    return scaled.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
