"""KD algorithms (registry ``algorithm``): what the student computes per micro-batch.

Importing this package registers every built-in algorithm: ``vanilla``, ``sft`` and the reward
objectives (``reward_kd``, ``opd``) here, and the
cross-tokenizer methods, each of which lives whole (config, algorithm, per-chunk term) in its own
module of :mod:`kdlib.xtok`.
"""

from kdlib.algorithms.base import ALGORITHMS, Algorithm, StudentForward, register_algorithm
from kdlib.algorithms import sft as _sft, vanilla as _vanilla  # noqa: F401  (register built-ins)
from kdlib.algorithms import reward as _reward  # noqa: F401
from kdlib.xtok import dskd as _dskd, gold as _gold, marginal as _marginal, overlap as _overlap  # noqa: F401
from kdlib.xtok import uld as _uld  # noqa: F401

__all__ = ["ALGORITHMS", "Algorithm", "StudentForward", "register_algorithm"]
