"""handgrad: backpropagation derived by hand, in matrix form, as PyTorch autograd Functions."""
from . import functional, ops
from . import nn
from ._enable import enable  # context manager and decorator: torch functions → handgrad's
from .convert import convert, revert  # the functions; the module stays importable as sys.modules['handgrad.convert']
from . import per_sample  # capture(model), norms(model): per-sample gradients and their norms
from . import testing  # check_function, check_module, assert_gradients_match; the op registry

__version__ = "0.1.0"
__all__ = ["functional", "ops", "nn", "convert", "revert", "enable", "per_sample", "testing", "__version__"]
