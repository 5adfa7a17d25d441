"""handgrad's modules: ``torch.nn``'s names, arguments, parameters, init and repr, with the
hand-derived backward passes of ``handgrad.functional``.

``from handgrad import nn`` drops in for ``from torch import nn`` for the modules listed in
``__all__``; ``MLP`` is the seed's network.
"""
from ._attention import *  # noqa: F401,F403
from ._attention import __all__ as _attention_all
from ._conv import *  # noqa: F401,F403
from ._conv import __all__ as _conv_all
from ._layers import *  # noqa: F401,F403
from ._layers import __all__ as _layers_all
from ._mlp import MLP
from ._modules import *  # noqa: F401,F403
from ._modules import __all__ as _modules_all
from ._pool import *  # noqa: F401,F403
from ._pool import __all__ as _pool_all

__all__ = [*_modules_all, "MLP", *_layers_all, *_conv_all, *_pool_all, *_attention_all]
