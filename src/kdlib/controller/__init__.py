"""Modes (registry ``mode``): one class per ``Mode`` value, the single place that drives a run.

Every value of :class:`kdlib.config.Mode` has exactly one entry here (a test checks it), registered
lazily so that composing a config does not import the training stack.
"""

from kdlib.registry import Registry

MODES: Registry[type] = Registry("mode")
MODES.register("offpolicy", "kdlib.controller.offpolicy:OffPolicyMode")
MODES.register("sft", "kdlib.controller.offpolicy:SFTMode")
MODES.register("onpolicy", "kdlib.controller.onpolicy:OnPolicyMode")
MODES.register("generate", "kdlib.controller.generate:GenerateMode")
MODES.register("cache", "kdlib.controller.cache:CacheMode")

__all__ = ["MODES"]
