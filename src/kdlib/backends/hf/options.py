"""The hf backend's typed options: its rollout config (which decode engine, which token draw)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from kdlib.config.rollout import RolloutConfig


class RolloutEngine(str, Enum):
    """How the hf rollout backend decodes (all sample the model's own distribution)."""

    # `static` where kdlib's decode engine was tested with the installed torch, else `generate`;
    # a model that fails the engine's checks falls back to `generate` with the reason logged once
    auto = "auto"
    # transformers' model.generate as is (dynamic KV cache): the reference
    generate = "generate"
    # kdlib's decode loop on generate's preparation: static KV cache kept across calls, batched
    # prefill, a faster head product; same processors and random draws as generate
    static = "static"
    # `static` with the decode step compiled by torch.compile (inductor); compile time is paid
    # on the first call of each batch size
    compiled = "compiled"
    # `compiled` with the weights frozen into the compiled step (inductor's freezing and its C++
    # GEMM kernels, which pack the weights once): the fastest decoding kdlib measured on CPU;
    # loading new weights (on-policy sync) packs them again in place. Its first call compiles
    # for tens of seconds.
    frozen = "frozen"


class RolloutSampler(str, Enum):
    """How kdlib's decode engines draw a token from the processed distribution."""

    # torch.multinomial's draw, as generate draws (one exponential variate per vocabulary entry),
    # so a seed gives generate's tokens
    multinomial = "multinomial"
    # one float64 uniform per row against the cumulative distribution: the same distribution,
    # far fewer random numbers, but other tokens than generate's for a given seed
    inverse_cdf = "inverse_cdf"


@dataclass
class HFRolloutConfig(RolloutConfig):
    """rollout=hf: sampling with transformers, optionally through kdlib's decode engine."""

    backend: str = "hf"
    # Decoding engine: auto | generate | static | compiled | frozen (see RolloutEngine).
    engine: RolloutEngine = RolloutEngine.auto
    # Token draw of kdlib's engines (static, compiled, frozen): multinomial | inverse_cdf.
    sampler: RolloutSampler = RolloutSampler.multinomial

    def resolve(self, cfg: Any, device_type: str, record: Any) -> None:
        from kdlib.backends.hf.decode.gate import tested_torch

        tested, reason = tested_torch()
        if self.engine is RolloutEngine.auto:
            self.engine = RolloutEngine.static if tested else RolloutEngine.generate
            record("rollout.engine", self.engine.value, reason)
        elif self.engine is not RolloutEngine.generate and not tested:
            record("rollout.engine", RolloutEngine.generate.value,
                   f"{reason}; rollout.engine={self.engine.value} is not used")
            self.engine = RolloutEngine.generate
