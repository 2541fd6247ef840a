"""The transformers backend: the embedded default, on CPU or GPU.

Registers the ``hf`` teacher backend (inference mode, head identity checked, sleep/wake by moving
weights, weight loading for self-distillation, image+text teachers) and the ``hf`` rollout backend
(``model.generate`` or kdlib's version-gated decode engine, and generation about images). Weights
reach its rollout engines through the transport (the default weight sync).
"""

from kdlib.backends.base import IMAGE_ROLLOUT_BACKENDS, ROLLOUT_BACKENDS, TEACHER_BACKENDS, TeacherCapabilities
from kdlib.backends.hf.options import HFRolloutConfig
from kdlib.config.models import TeacherBackendConfig

TEACHER_BACKENDS.register(
    "hf", "kdlib.backends.hf.teacher:HFTeacherBackend", config=TeacherBackendConfig,
    info=TeacherCapabilities(signals=("hidden",), sleep_wake=True, load_weights=True, images=True, transformers=True),
)
ROLLOUT_BACKENDS.register("hf", "kdlib.backends.hf.rollout:HFRolloutBackend", config=HFRolloutConfig)
IMAGE_ROLLOUT_BACKENDS.register("hf", "kdlib.backends.hf.vision_rollout:HFImageGeneration")
