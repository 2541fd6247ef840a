"""Teacher inference backends (registry ``teacher backend``), each with its declared capabilities."""

from kdlib.config.schema import SGLangTeacherConfig
from kdlib.teacher.base import TEACHER_BACKENDS, TeacherBackend, TeacherCapabilities

TEACHER_BACKENDS.register(
    "hf", "kdlib.teacher.hf:HFTeacherBackend",
    info=TeacherCapabilities(topk_logprobs=False, sleep_wake=True, load_weights=True, images=True),
)
TEACHER_BACKENDS.register(
    "sglang", "kdlib.teacher.sglang:SGLangTeacherBackend", config=SGLangTeacherConfig,
    info=TeacherCapabilities(topk_logprobs=True, sleep_wake=True, load_weights=False),
)

__all__ = ["TEACHER_BACKENDS", "TeacherBackend", "TeacherCapabilities"]
