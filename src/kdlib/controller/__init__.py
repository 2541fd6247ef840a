"""Controller loops, one per mode: the single place that drives data through the workers."""

from kdlib.config.schema import Mode
from kdlib.controller.generate import GenerateLoop
from kdlib.controller.offpolicy import OffPolicyLoop
from kdlib.controller.onpolicy import OnPolicyLoop

LOOPS = {Mode.offpolicy: OffPolicyLoop, Mode.onpolicy: OnPolicyLoop, Mode.generate: GenerateLoop}

__all__ = ["LOOPS", "GenerateLoop", "OffPolicyLoop", "OnPolicyLoop"]
