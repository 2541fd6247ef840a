"""Controller loops, one per mode: the single place that drives data through the workers."""

from kdlib.config.schema import Mode
from kdlib.controller.generate import GenerateLoop
from kdlib.controller.offpolicy import OffPolicyLoop

LOOPS = {Mode.offpolicy: OffPolicyLoop, Mode.generate: GenerateLoop}

__all__ = ["LOOPS", "GenerateLoop", "OffPolicyLoop"]
