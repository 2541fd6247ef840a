"""The served backend: a teacher kdlib does not run, behind an OpenAI-compatible completions server.

Registers the ``served`` teacher backend (``teacher/backend=served``): the teacher's top-k
log-probabilities of each prompt position from ``/v1/completions`` (echo, logprobs), the only
signal such a server returns, so the only one it declares. It loads no weights, cannot sleep or
take the student's weights, and needs ``httpx`` (``pip install 'kdlib[served]'``), imported only
when the backend starts. See docs/served_teacher.md.
"""

from kdlib.backends.base import TEACHER_BACKENDS, TeacherCapabilities
from kdlib.backends.served.options import ServedTeacherOptions

TEACHER_BACKENDS.register(
    "served", "kdlib.backends.served.teacher:ServedTeacherBackend", config=ServedTeacherOptions,
    info=TeacherCapabilities(signals=("topk",), sleep_wake=False, load_weights=False),
)
