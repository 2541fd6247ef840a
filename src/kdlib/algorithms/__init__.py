"""KD algorithms (registry ``algorithm``): what the student computes per micro-batch."""

from kdlib.algorithms.base import ALGORITHMS, Algorithm, StudentForward, register_algorithm
from kdlib.algorithms import sft as _sft, vanilla as _vanilla  # noqa: F401  (register built-ins)
from kdlib.algorithms import dskd as _dskd, gold as _gold, overlap as _overlap, uld as _uld  # noqa: F401
from kdlib.algorithms import marginal as _marginal  # noqa: F401

__all__ = ["ALGORITHMS", "Algorithm", "StudentForward", "register_algorithm"]
