"""handgrad's modules: ``torch.nn``'s names, arguments, parameters, init and repr, with the
hand-derived backward passes of ``handgrad.functional``.

``from handgrad import nn`` drops in for ``from torch import nn`` for the modules listed in
``__all__``; ``MLP`` is the seed's network.
"""
from ._mlp import MLP
from ._modules import *  # noqa: F401,F403
from ._modules import __all__ as _modules_all

__all__ = [*_modules_all, "MLP"]
# issue 10's layers (H9)
from ._layers import *  # noqa: F401,F403,E402
from ._layers import __all__ as _layers_all  # noqa: E402

__all__ += _layers_all
