"""KD algorithms (registry ``algorithm``): what the student computes per micro-batch."""

from kdlib.algorithms.base import ALGORITHMS, Algorithm, StudentForward, register_algorithm
from kdlib.algorithms import sft as _sft, vanilla as _vanilla  # noqa: F401  (register built-ins)

__all__ = ["ALGORITHMS", "Algorithm", "StudentForward", "register_algorithm"]
