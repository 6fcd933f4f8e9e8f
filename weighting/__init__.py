"""Loss-weighting strategies for multi-branch models (Table 2 baselines), independent of the architecture.

A model used with them provides ``trunk(x) -> z``, ``heads(z) -> logits [B, T, C]``, ``forward = heads o trunk``
and ``last_shared_layer`` (GradNorm's W); uniform, kendall, dwa, rlw and famo only call ``forward``.
"""
import inspect

from .aligned_mtl import AlignedMTL
from .base import Weighting
from .cagrad import CAGrad
from .dwa import DWA
from .famo import FAMO
from .gradnorm import GradNorm
from .imtl import IMTL
from .kendall import Kendall
from .mgda import MGDA
from .nash_mtl import NashMTL
from .pcgrad import PCGrad
from .rlw import RLW
from .sum import Sum
from .uniform import Uniform

WEIGHTINGS = {"uniform": Uniform, "sum": Sum, "gradnorm": GradNorm, "kendall": Kendall, "mgda": MGDA,
              # beyond the paper (docs/weightings.md)
              "dwa": DWA, "rlw": RLW, "pcgrad": PCGrad, "cagrad": CAGrad, "imtl": IMTL, "nash_mtl": NashMTL,
              "aligned_mtl": AlignedMTL, "famo": FAMO}


def build_weighting(name, num_tasks, options=None):
    """``WEIGHTINGS[name](num_tasks, **options)``; ValueError for an unknown name or option key."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; valid: {', '.join(WEIGHTINGS)}")
    cls, options = WEIGHTINGS[name], dict(options or {})
    valid = [p for p in inspect.signature(cls).parameters if p != "num_tasks"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for weighting {name!r}; valid: {', '.join(valid) or 'none'}")
    return cls(num_tasks, **options)


__all__ = ["WEIGHTINGS", "Weighting", "build_weighting", *(cls.__name__ for cls in WEIGHTINGS.values())]
