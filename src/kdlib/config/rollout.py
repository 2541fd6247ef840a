"""How a run samples text: the options every rollout backend shares, and the hooks a backend fills.

``rollout=<backend>`` selects a registered rollout backend and its config class (a subclass of
:class:`RolloutConfig` holding the backend's own options, e.g. the hf backend's decode engine), so
the shared schema names no backend. A backend also says how the student's weights reach it after
each on-policy step (:meth:`RolloutConfig.weight_sync_strategy`, a name in ``kdlib.backends``' weight-sync
registry; through the transport by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdlib.config.node import ConfigNode

# The weight sync every backend can do: buckets of the student's weights through the transport,
# loaded by the backend's load_weights.
TRANSPORT_SYNC = "transport"


@dataclass
class RolloutConfig(ConfigNode):
    """Sampling settings for generation (teacher data synthesis, student rollouts)."""

    # Generation backend (registry `rollout backend`): hf, or another registered one.
    backend: str = "hf"
    # Longest response, in tokens; longer ones are cut and counted as truncated.
    max_new_tokens: int = 256
    # Sampling temperature; 0 means greedy decoding.
    temperature: float = 1.0
    # Nucleus sampling threshold (1.0 = off).
    top_p: float = 1.0
    # Prompts per generate() call.
    batch_size: int = 16
    # Responses sampled per prompt.
    n_samples_per_prompt: int = 1
    # Rollout engines (more than one needs launcher=ray).
    num_workers: int = 1
    # Log one sampled prompt and response every this many steps (0 = never); every rollout is
    # written to rollouts.jsonl in the run directory either way.
    print_every: int = 0

    def check(self) -> None:
        for name in ("max_new_tokens", "batch_size", "n_samples_per_prompt", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.print_every < 0:
            raise ValueError(f"print_every must be >= 0 (0 = never), got {self.print_every}")

    def weight_sync_strategy(self) -> str:
        """The weight-sync strategy (registry name) that brings the student's weights here."""
        return TRANSPORT_SYNC

    def resolve(self, cfg: Any, device_type: str, record: Any) -> None:
        """Settle this backend's ``auto`` options (``record(key, value, reason)``); none by default."""

    def check_run(self, cfg: Any) -> None:
        """Rules across the whole config (raise ConfigError); none by default."""
