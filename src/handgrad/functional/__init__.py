"""handgrad's public functions: the names, arguments, defaults and results of
``torch.nn.functional``, with hand-derived backward passes (see ``handgrad.ops``).

``import handgrad.functional as F`` drops in for ``import torch.nn.functional as F``.
Each area's argument handling lives in one private module; the math lives in ``handgrad.ops``.
"""
from ._activations import *  # noqa: F401,F403
from ._attention import *  # noqa: F401,F403
from ._conv import *  # noqa: F401,F403
from ._dropout import *  # noqa: F401,F403
from ._elementwise import *  # noqa: F401,F403
from ._embedding import *  # noqa: F401,F403
from ._fused import *  # noqa: F401,F403
from ._linear import *  # noqa: F401,F403
from ._losses import *  # noqa: F401,F403
from ._mha import *  # noqa: F401,F403
from ._normalize import *  # noqa: F401,F403
from ._norms import *  # noqa: F401,F403
from ._pool import *  # noqa: F401,F403
from ._reduction import *  # noqa: F401,F403
from ._softmax import *  # noqa: F401,F403
from . import (_activations, _attention, _conv, _dropout, _elementwise, _embedding, _fused, _linear, _losses, _mha, _normalize,
               _norms, _pool, _reduction, _softmax)

_AREAS = (_linear, _activations, _softmax, _norms, _normalize, _conv, _pool, _embedding, _dropout, _attention, _mha, _losses, _fused,
          _reduction, _elementwise)
__all__ = [name for m in _AREAS for name in m.__all__]
