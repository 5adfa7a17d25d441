"""handgrad: backpropagation derived by hand, in matrix form, as PyTorch autograd Functions."""
from . import functional, ops

__version__ = "0.1.0"
__all__ = ["functional", "ops", "__version__"]
