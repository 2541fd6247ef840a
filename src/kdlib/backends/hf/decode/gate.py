"""The decode engine's version gate: the torch releases it was tested with.

kdlib's decode engine reaches into parts of torch and transformers that have no stability promise
(inductor's packing of frozen weights, the byte layout of torch's Mersenne Twister state, the
static KV cache's calling convention). It was tested with the torch releases below; with any other
torch, rollouts use plain ``generate`` (the same distribution, slower), and the run's resolved
config says so once (``auto_choices["rollout.engine"]``).
"""

from __future__ import annotations

import functools

# Minor releases of torch the decode engine's tests ran on.
TESTED_TORCH = ("2.13",)


@functools.lru_cache(maxsize=None)
def tested_torch() -> tuple[bool, str]:
    """(whether the installed torch is one the engine was tested with, the reason in words)."""
    import torch

    version = torch.__version__.split("+")[0]
    minor = ".".join(version.split(".")[:2])
    if minor in TESTED_TORCH:
        return True, f"kdlib's decode engine was tested with torch {minor}"
    return False, (f"torch {version} is not one kdlib's decode engine was tested with "
                   f"({', '.join(TESTED_TORCH)}): plain generate")
