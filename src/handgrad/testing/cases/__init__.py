"""The op cases, one module per area; ``CASES`` is the registry (see ..registry)."""
from . import activations, fused, linear, losses, norms, softmax

CASES = [*linear.CASES, *activations.CASES, *softmax.CASES, *norms.CASES, *losses.CASES, *fused.CASES]

from . import conv  # noqa: E402
CASES += conv.CASES
