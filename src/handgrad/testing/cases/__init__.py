"""The op cases, one module per area; ``CASES`` is the registry (see ..registry)."""
from . import activations, attention, conv, fused, layers, linear, losses, norms, softmax, tensor_math

CASES = [*linear.CASES, *activations.CASES, *softmax.CASES, *norms.CASES, *layers.CASES, *conv.CASES, *attention.CASES,
         *losses.CASES, *fused.CASES, *tensor_math.CASES]
