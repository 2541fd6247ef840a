"""Frozen-weight decode steps that follow weight syncs: inductor's packed weights, repacked in place.

Compiled with inductor's freezing, a decode step reads its weights as constants, and inductor's C++
GEMM template packs each constant weight once, at compile time, into the blocked layout its kernels
stream at close to the memory bandwidth (the fastest decode step kdlib measured on CPU). Those
packed copies are what the step reads, so a weight sync that copies new values into the parameters
does not reach them, and compiling again costs tens of seconds per sync. While the step compiles,
:class:`PackedWeights` records each packing inductor does (the weight it read, which is a view of
the parameter, and the packed tensor it made), so that after a sync :meth:`PackedWeights.refresh`
redoes the packing into the same tensors (a tenth of a second for SmolLM2's 10-layer student).
Nothing here assumes that this covers everything the compiled step reads: :func:`follows_weights`
scales every weight by +-2, refreshes, compares the step with the eager forward and scales the
weights back; an engine whose step fails that check compiles again at each sync instead.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Iterator

import torch
from torch import nn

from kdlib.errors import first_line

log = logging.getLogger(__name__)

# Inductor settings of a frozen-weight step: weights folded into the graph as constants, every
# product that inductor's C++ GEMM template can run given to it (it packs constant weights once;
# ATen is used only where the template does not apply), and no FX graph cache: a cached graph
# brings its packed constants from disk without the packing this module records.
FROZEN_COMPILE_OPTIONS = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP",
    "fx_graph_cache": False,
}


class PackedWeights:
    """The weight packings inductor did while a frozen step compiled, to be redone after a sync."""

    def __init__(self) -> None:
        self._packings: list[tuple[Callable[[], torch.Tensor], torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self._packings)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """While active, every constant weight inductor's C++ GEMM template packs is recorded."""
        try:
            import torch._inductor.compile_fx  # noqa: F401 - the template module, imported alone, is a circular import
            from torch._inductor.codegen.cpp_gemm_template import CppGemmTemplate
        except ImportError:
            CppGemmTemplate = None
        original = vars(CppGemmTemplate).get("prep_weight") if CppGemmTemplate is not None else None
        if not isinstance(original, classmethod):  # another torch: nothing recorded, follows_weights says so
            yield
            return
        CppGemmTemplate.prep_weight = classmethod(functools.partial(_recording_prep_weight, original.__func__, self))
        try:
            yield
        finally:
            CppGemmTemplate.prep_weight = original

    @torch.no_grad()
    def refresh(self) -> None:
        """Pack each recorded weight again, from its current values, into the tensor the step reads."""
        for pack, packed in self._packings:
            packed.copy_(pack())

    def add(self, pack: Callable[[], torch.Tensor], packed: torch.Tensor) -> None:
        """Record that ``packed`` holds ``pack()``, a packing of weights that a sync overwrites."""
        self._packings.append((pack, packed))


def _recording_prep_weight(prep_weight, packings: PackedWeights, cls, inputs, layout, micro_gemm,
                           should_block_weight, *args, **kwargs):
    """``CppGemmTemplate.prep_weight``, recording the packing of a constant weight (the call whose
    result becomes a constant of the graph is the one that skips int8 compensation)."""
    new_inputs, new_layout = prep_weight(cls, inputs, layout, micro_gemm, should_block_weight, *args, **kwargs)
    weight, packed = inputs[1], new_inputs[1]
    if kwargs.get("skip_int8_compensation") and _is_dense(weight) and _is_dense(packed) and packed is not weight:
        # the activation input only tells prep_weight whether the product is int8
        stub = [torch.empty(0, dtype=_dtype(inputs[0])), weight]

        def pack() -> torch.Tensor:
            return prep_weight(cls, stub, layout, micro_gemm, should_block_weight, *args, **kwargs)[0][1]

        packings.add(pack, packed)
    return new_inputs, new_layout


def _is_dense(value) -> bool:
    return isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_meta


def _dtype(node) -> torch.dtype:
    return node.dtype if isinstance(node, torch.Tensor) else node.get_dtype()


def synced_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What a weight sync overwrites: the floating-point entries of the state dict, once each."""
    seen: dict[int, torch.Tensor] = {}
    for tensor in model.state_dict(keep_vars=True).values():
        if tensor.is_floating_point():
            seen.setdefault(id(tensor), tensor)
    return list(seen.values())


@torch.no_grad()
def follows_weights(model: nn.Module, packed: PackedWeights, compare: Callable[[], float], tolerance: float) -> bool:
    """Whether the compiled step reads the current weights once ``packed`` is refreshed.

    Every synced tensor is scaled by 2 or -2 (the sign drawn per tensor from a local generator: the
    sampler's is untouched), ``packed`` is refreshed, and ``compare()`` (the compiled step against
    the eager forward, as an error relative to the logit scale) must be within ``tolerance``; a
    constant the refresh does not reach would still hold the old weights and miss by far more.
    Scaling by a power of two is exact and so is undoing it: the weights come back bit for bit
    without a copy of them being kept, and ``packed`` is refreshed again before returning. A
    ``compare()`` that raises counts as not following.
    """
    tensors = synced_tensors(model)
    generator = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (len(tensors),), generator=generator).mul(2).sub(1).tolist()
    error = float("nan")
    try:
        for tensor, sign in zip(tensors, signs):
            tensor.mul_(2.0 * sign)
        packed.refresh()
        error = compare()
    except Exception as exc:  # noqa: BLE001 - any failure means "compile again at each sync"
        log.warning("rollout engine: checking the frozen step with moved weights failed (%s: %s)",
                    type(exc).__name__, first_line(exc))
    finally:
        for tensor, sign in zip(tensors, signs):
            tensor.mul_(0.5 * sign)
        packed.refresh()
    if not error <= tolerance:
        log.warning("rollout engine: the frozen step does not follow moved weights after repacking (error %.3g); "
                    "each weight sync will compile it again", error)
        return False
    return True
