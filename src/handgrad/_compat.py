"""Every private torch API handgrad uses, and every torch-version difference, in one place.

Each name below wraps one private torch attribute. If a torch release moves or removes it,
``import handgrad`` still works and the fallback is the answer that is correct either way (a
"cannot tell" is answered by the conservative branch: take ``Function.apply``'s full path, save
the tensors, skip an optimisation), never a guess that could change a result. ``tests/test_compat.py``
exercises each fallback. No math here.

The supported torch range is ``TORCH_FLOOR`` and up (``pyproject.toml`` says the same; CI tests
the floor as well as the newest torch).
"""
from __future__ import annotations

import importlib
import warnings
from types import SimpleNamespace

import torch

TORCH_FLOOR = (2, 4)


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch (``2.13.0+cpu`` → ``(2, 13)``)."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


# ---- features of torch's own ops that older torch in the range lacks ---------------------------

class TorchLacks(BaseException):
    """Raised by a torch reference (``requires_torch``) that the running torch cannot compute.
    A BaseException, like pytest's own skip, so that it passes ``except Exception`` (a bad-input
    test expecting torch to raise) and reaches the runner: tests/conftest.py reports it as a skip."""


def requires_torch(version: tuple[int, int], feature: str, fn, when=None):
    """``fn`` itself on torch ≥ ``version``; on older torch a stand-in that raises ``TorchLacks``
    naming ``feature`` (for every call, or where ``when(*args, **kwargs)`` holds, else ``fn``)."""
    if torch_version() >= version:
        return fn

    def lacking(*args, **kwargs):
        if when is None or when(*args, **kwargs):
            raise TorchLacks(f"torch < {'.'.join(map(str, version))} lacks {feature} (torch {torch.__version__})")
        return fn(*args, **kwargs)

    lacking.__name__ = lacking.__qualname__ = getattr(fn, "__name__", "reference")
    lacking.__wrapped__ = fn
    return lacking


def _mse_weighted(input, target, *args, **kwargs):
    return len(args) > 3 or kwargs.get("weight") is not None


def _linear_full_bias(input, weight, bias=None):
    return bias is not None and bias.dim() > 1 and input.dim() > 2


def _gqa_or_bool_mask(query, key, value, attn_mask=None, *args, **kwargs):
    return bool(kwargs.get("enable_gqa")) or (isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.bool)


def _unbatched_wrong_target(input, target, *args, **kwargs):
    return isinstance(input, torch.Tensor) and input.dim() == 1 and target.numel() != 1


def _bfloat16(input, *args, **kwargs):
    return input.dtype == torch.bfloat16


# name in torch.nn.functional: (first torch that has it, what older torch lacks, which calls need
# it). Versions measured on the PyPI builds 2.4.1, 2.5.1, 2.6.0, 2.7.1, 2.9.1, 2.10.0, 2.11.0, 2.13.0.
_REFERENCE_NEEDS = {
    "mse_loss": ((2, 6), "the weight argument of torch.nn.functional.mse_loss", _mse_weighted),
    "linear": ((2, 10), "torch.nn.functional.linear with a full-shape bias on a ≥3-D input", _linear_full_bias),
    # torch 2.4 … 2.6's CPU kernel rounds the bfloat16 backward in another order, so its worst error
    # differs from handgrad's by rounding luck (over 300 seeded draws the ratio of the worst errors
    # has median 1.00, but 2% exceed the low-precision rule's 2×); from 2.7 on both round alike
    "softmax": ((2, 7), "a CPU bfloat16 softmax backward that rounds as handgrad's does", _bfloat16),
    # the bounds below are the two ends measured (2.4.1 lacks it, 2.13.0 has it), not bisected
    "linear_cross_entropy": ((2, 13), "torch.nn.functional.linear_cross_entropy", None),
    "scaled_dot_product_attention": ((2, 13), "enable_gqa, and 0 (not nan) for a fully masked row of a bool "
                                              "attn_mask, in scaled_dot_product_attention", _gqa_or_bool_mask),
    "cross_entropy": ((2, 13), "cross_entropy's ValueError for an unbatched input with a target of size ≠ 1",
                      _unbatched_wrong_target),
}

# Dynamo of torch before 2.13 (measured: 2.4.1) cannot trace these in one graph: an
# autograd.Function called from another's backward ("too many positional arguments"; conv, the
# pools, linear_cross_entropy), ``hasattr`` on a tensor (the MHA mask helpers), a bool from a
# torch helper (``_mha_shape_check``). handgrad's compile check reports them as what that torch
# lacks; on 2.13 they compile in one graph (tested).
OLD_DYNAMO_LIMITS = (
    (2, 13), ("too many positional arguments", "hasattr TensorVariable", "returned non-Tensor bool"),
)


def torch_reference(name: str, fn=None):
    """``fn`` (default ``torch.nn.functional.<name>``) as a test reference: the function itself,
    or on a torch in the range that lacks a feature handgrad's twin has, a stand-in raising
    ``TorchLacks`` for the calls that need it."""
    fn = getattr(torch.nn.functional, name, None) if fn is None else fn
    if name not in _REFERENCE_NEEDS:
        return fn
    version, feature, when = _REFERENCE_NEEDS[name]
    return requires_torch(version, feature, fn, when)


# ---- torch.func / forward-AD state -------------------------------------------------------------

def _private(getter):
    """The private attribute ``getter()`` reads, or None where this torch has no such thing."""
    try:
        return getter()
    except (ImportError, AttributeError):
        return None


_transforms_active = _private(lambda: torch._C._are_functorch_transforms_active)
_is_batched = _private(lambda: torch._C._functorch.is_batchedtensor)
_is_legacy_batched = _private(lambda: torch._C._functorch.is_legacy_batchedtensor)
_is_wrapped = _private(lambda: torch._C._functorch.is_functorch_wrapped_tensor)
_forward_ad = _private(lambda: importlib.import_module("torch.autograd.forward_ad"))
_top_saved_hooks = _private(lambda: torch._C._autograd._top_saved_tensors_default_hooks)
_unwrap_dead = _private(lambda: importlib.import_module("torch._functorch.utils").unwrap_dead_wrappers)
_any_autocast = _private(lambda: torch._C._is_any_autocast_enabled)


def any_autocast_enabled() -> bool:
    """Is autocast on for any device (one C call, 0.1 µs, where asking cpu and cuda costs 0.5)?
    Fallback: True (then the caller asks each device)."""
    return True if _any_autocast is None else _any_autocast()

# aten's im2col + GEMM convolution kernels (forward ops; torch's own choice for tiny convs), where a
# oneDNN primitive's fixed cost (~35 µs a call) dwarfs the arithmetic. Fallback: torch.convolution.
thnn_conv2d = _private(lambda: torch._C._nn.thnn_conv2d)
slow_conv_transpose2d = _private(lambda: torch._C._nn.slow_conv_transpose2d)


# Dynamo of torch 2.4 cannot trace the query ("torch.* op returned non-Tensor bool"); there,
# while compiling, the answer is the conservative True.
_DYNAMO_TRACES_TRANSFORM_QUERY = torch_version() >= (2, 5)


def functorch_transforms_active() -> bool:
    """Is a torch.func transform (vmap, grad, jvp, …) running? Fallback: True (take the path
    that is right under a transform too; only slower)."""
    if _transforms_active is None or not (_DYNAMO_TRACES_TRANSFORM_QUERY or not torch.compiler.is_compiling()):
        return True
    return _transforms_active()


def forward_ad_active() -> bool:
    """Is a forward-AD dual level open (``torch.autograd.forward_ad.dual_level``)? Fallback: True
    (save the tensors a jvp would read)."""
    level = getattr(_forward_ad, "_current_level", None)
    return True if level is None else level >= 0


def saved_tensors_hooks_active() -> bool:
    """Is a ``torch.autograd.graph.saved_tensors_hooks`` context open (``save_on_cpu``,
    checkpointing, a test counting saved bytes)? Fallback, and under Dynamo: True (save through
    ``save_for_backward``, which the hooks see)."""
    if _top_saved_hooks is None or torch.compiler.is_compiling():
        return True
    return _top_saved_hooks(False) is not None


def is_batched_tensor(t: torch.Tensor) -> bool:
    """Is ``t`` a vmap-batched tensor (torch.func's, or the legacy vmap that batches the output
    gradients of ``is_grads_batched``)? Fallback: True (the path that works under vmap)."""
    if _is_batched is None or _is_legacy_batched is None:
        return True
    return _is_batched(t) or _is_legacy_batched(t)


# Dynamo of torch 2.4 runs a torch.nn module it does not inline (handgrad's twins subclass torch.nn
# classes) on FakeTensors as plain Python, and AOT traces it again under fake/proxy dispatch modes,
# where torch.compiler.is_compiling() is False: a branch on a value must ask this too. Fallback:
# no tensor's values are readable (the branch-free path, as compiled).
try:
    from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor
    _get_mode, _MODES = torch._C._get_dispatch_mode, tuple(
        getattr(torch._C._TorchDispatchModeKey, k) for k in ("FAKE", "PROXY", "FUNCTIONAL")
        if hasattr(torch._C._TorchDispatchModeKey, k))
except (ImportError, AttributeError):            # pragma: no cover - where torch moved them
    _FakeTensor = None


def values_readable(t: torch.Tensor | None = None) -> bool:
    """May Python branch on ``t``'s values: not compiling, not a FakeTensor, no fake, proxy or
    functional dispatch mode active (torch 2.4's Dynamo runs modules it does not inline that way)?"""
    if torch.compiler.is_compiling() or _FakeTensor is None or isinstance(t, _FakeTensor):
        return False
    for k in _MODES:                 # (a loop, not any(generator): 0.5 µs less, it runs every kernel call)
        if _get_mode(k) is not None:
            return False
    return True


def is_functorch_wrapped(t: torch.Tensor) -> bool:
    """Is ``t`` wrapped by a torch.func transform (values Python cannot branch on)? Fallback:
    True (skip the value-dependent check; the op itself still runs)."""
    return True if _is_wrapped is None else _is_wrapped(t)


# ``Function.apply`` unwraps tensors that escaped a finished torch.func transform before the C++
# apply; ``HandFunction.call``'s fast path must do the same. None where torch moved it: then
# ``call`` always goes through ``Function.apply`` (no fast path, nothing skipped).
unwrap_dead_wrappers = _unwrap_dead


# ---- torch.nn._reduction (the deprecated size_average / reduce flags) -------------------------

def _legacy_get_string(size_average, reduce, emit_warning=True):
    # torch/nn/_reduction.py, as of torch 2.4 … 2.13
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    ret = "mean" if size_average and reduce else "sum" if reduce else "none"
    if emit_warning:
        warnings.warn(f"size_average and reduce args will be deprecated, please use reduction='{ret}' instead.",
                      stacklevel=3)
    return ret


def _get_enum(reduction):
    if reduction == "elementwise_mean":
        warnings.warn("reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.")
        reduction = "mean"
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return {"none": 0, "mean": 1, "sum": 2}[reduction]


_REDUCTION_FALLBACK = SimpleNamespace(legacy_get_string=_legacy_get_string, get_enum=_get_enum)
nn_reduction = _private(lambda: importlib.import_module("torch.nn._reduction")) or _REDUCTION_FALLBACK


# ---- torch.nn.functional's private MultiheadAttention helpers ----------------------------------
# handgrad's multi_head_attention_forward validates and merges masks exactly as torch's does, with
# torch's own helpers where they exist; the fallbacks are their rules as of torch 2.4 … 2.13.

def _none_or_dtype_fallback(input):
    if input is None:
        return None
    if isinstance(input, torch.Tensor):
        return input.dtype
    raise RuntimeError("input to _none_or_dtype() must be None or torch.Tensor")


def _canonical_mask_fallback(mask, mask_name, other_type, other_name, target_type, check_other=True):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=target_type).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {mask_name} are supported")
    return mask


def _mha_shape_check_fallback(query, key, value, key_padding_mask, attn_mask, num_heads):
    # True for batched (3-D) query, False for unbatched (2-D); torch also checks the other shapes
    if query.dim() == 3:
        return True
    if query.dim() == 2:
        return False
    raise AssertionError(f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor")


def _nn_private(name: str, fallback):
    fn = getattr(torch.nn.functional, name, None)
    return fn if callable(fn) else fallback


none_or_dtype = _nn_private("_none_or_dtype", _none_or_dtype_fallback)
canonical_mask = _nn_private("_canonical_mask", _canonical_mask_fallback)
mha_shape_check = _nn_private("_mha_shape_check", _mha_shape_check_fallback)


# ---- torch.nn.TransformerEncoderLayer's native fast path --------------------------------------

# The attribute its forward reads to decide whether the fused kernel may run; a falsy value
# sends it through the submodules (torch/nn/modules/transformer.py, torch 2.4 … 2.13).
ENCODER_FAST_PATH_FLAG = "activation_relu_or_gelu"
# TransformerEncoder's nested-tensor path, which needs every layer's fast path.
ENCODER_NESTED_FLAG = "use_nested_tensor"


def has_encoder_fast_path_flag(layer: torch.nn.Module) -> bool:
    """Does this torch's ``TransformerEncoderLayer`` keep its fast-path switch where ``convert``
    turns it off? False means torch moved it: ``convert`` then warns that the eval-mode fast path
    may bypass the handgrad ops instead of failing."""
    return ENCODER_FAST_PATH_FLAG in vars(layer)


# ---- torch._dynamo ---------------------------------------------------------------------------

class _NeverRaised(Exception):
    """Stands in for Dynamo's Unsupported where torch moved it: a fullgraph refusal then
    surfaces as the error it is instead of being caught as 'cannot trace'."""


def dynamo_unsupported() -> type[BaseException]:
    """``torch._dynamo.exc.Unsupported`` (imported on demand: importing Dynamo is slow)."""
    exc = _private(lambda: importlib.import_module("torch._dynamo.exc").Unsupported)
    return _NeverRaised if exc is None else exc
