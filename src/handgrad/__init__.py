"""handgrad: backpropagation derived by hand, in matrix form, as PyTorch autograd Functions."""
from . import functional, ops
from . import nn
from .convert import convert, revert  # the functions; the module stays importable as sys.modules['handgrad.convert']

__version__ = "0.1.0"
__all__ = ["functional", "ops", "nn", "convert", "revert", "__version__"]
