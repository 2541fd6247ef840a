"""The SGLang backend: teacher and rollout engines on GPUs (needs ``kdlib[sglang]`` and CUDA).

Registers the ``sglang`` teacher backend (prefill-only scoring with hidden-state return and a head
self-check, or the engine's own top-k log-probabilities as the teacher signal, memory release for
colocation), the ``sglang``
rollout backend (weight-update sessions) and the ``sglang_broadcast`` weight sync (an NCCL
broadcast from student rank 0 into the engines). Every call into SGLang goes through
:mod:`.engine`, the one module that imports it, after a version check; its contract test reads the
installed SGLang's source. Registering imports nothing heavy.
"""

from kdlib.backends.base import ROLLOUT_BACKENDS, TEACHER_BACKENDS, WEIGHT_SYNCS, TeacherCapabilities
from kdlib.backends.sglang.options import BROADCAST_SYNC, SGLangRolloutConfig, SGLangTeacherOptions

TEACHER_BACKENDS.register(
    "sglang", "kdlib.backends.sglang.teacher:SGLangTeacherBackend", config=SGLangTeacherOptions,
    info=TeacherCapabilities(signals=("hidden", "topk"), sleep_wake=True, load_weights=False),
)
ROLLOUT_BACKENDS.register("sglang", "kdlib.backends.sglang.rollout:SGLangRolloutBackend", config=SGLangRolloutConfig)
WEIGHT_SYNCS.register(BROADCAST_SYNC, "kdlib.backends.sglang.sync:DistributedWeightSync")
