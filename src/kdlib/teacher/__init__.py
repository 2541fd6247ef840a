"""Teacher inference backends (registry ``teacher backend``)."""

from kdlib.teacher.base import TEACHER_BACKENDS, TeacherBackend

TEACHER_BACKENDS.register("hf", "kdlib.teacher.hf:HFTeacherBackend")

__all__ = ["TEACHER_BACKENDS", "TeacherBackend"]
