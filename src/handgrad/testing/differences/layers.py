"""The deliberate differences of linear, conv, embedding, the poolings and the reductions (mean).
Entries of ``differences.DIFFERENCES`` (see its docstring for the fields)."""
from __future__ import annotations

import torch

from .entry import Difference, _input, _not_tensor

__all__ = ["LAYERS"]


def _high_rank_bias(call) -> bool:
    from ..fuzz.call import Spec
    b = call.args[2] if len(call.args) > 2 else None
    if not isinstance(b, Spec) or len(b.shape) < 3:
        return False
    x, w = call.args[0], call.args[1]
    out = (*x.shape[:-1], *w.shape[:-1])
    try:
        return tuple(torch.broadcast_shapes(out, b.shape)) == tuple(out)
    except RuntimeError:
        return False


def _conv_nonfinite_or_huge(call) -> bool:
    """an inf or nan element, or one past 1e15 (|z| for complex): where a convolution's sums overflow
    or meet 0·inf"""
    return any(not (v := s.base.to(s.dtype).abs().double()).isfinite().all() or bool((v > 1e15).any())
               for s in call.specs() if s.dtype.is_floating_point or s.dtype.is_complex)


def _bool_empty_linear(call) -> bool:
    from ..fuzz.call import Spec
    x, w = call.args[0], call.args[1] if len(call.args) > 1 else None
    return (isinstance(x, Spec) and isinstance(w, Spec) and x.dtype == torch.bool and w.dtype == torch.bool
            and bool(x.shape) and x.shape[-1] == 0)


def _adaptive_size(call):
    """adaptive_avg_pool2d's output size as torch resolves it ((H_out, W_out)), or None."""
    x, size = _input(call), call.args[1] if len(call.args) > 1 else None
    if _not_tensor(call) or len(x.shape) not in (3, 4):
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(v is None or isinstance(v, int) for v in size):
        return None
    return tuple(x.shape[-2 + i] if v is None else v for i, v in enumerate(size))


def _adaptive_mean_path(call) -> bool:
    # torch's adaptive_avg_pool2d takes input.mean((-1, -2)) for an output size (1, 1)
    return _adaptive_size(call) == (1, 1)


def _adaptive_empty_output(call) -> bool:
    size = _adaptive_size(call)
    return size is not None and 0 in size


def _int64_input(call) -> bool:
    return not _not_tensor(call) and _input(call).dtype == torch.int64


LAYERS: tuple[Difference, ...] = (
    *(Difference(
        "conv: non-finite or overflowing values", op, ("value", "grad"), _conv_nonfinite_or_huge,
        "with an inf or nan element, or a sum past the dtype's range, the result depends on the CPU kernel "
        "torch picks for the shape (oneDNN skips the zero-padding taps and the taps a stride never reaches, "
        "im2col multiplies them: 0·inf is nan in one and not in the other; its complex convolution adds "
        "Gauss's three real products) and on the order of the overflowing sum (a bfloat16 output whose "
        "float64 value is +1.1e70 comes out -inf)",
        "the IEEE result of handgrad's own products: a float16/bfloat16 sum past float32's range is "
        "recomputed in float64, so an overflow has the sign of the true sum",
        "No single answer is torch's: its own kernels disagree on these inputs, call by call. handgrad's "
        "follows one rule, and its overflows have the true sum's sign.",
        "python -m handgrad.testing.fuzz --call conv2d:75509310767") for op in ("conv1d", "conv2d")),
    Difference(
        "linear: a bias of 3 or more dims that broadcasts", "linear", ("exception",), _high_rank_bias,
        "F.linear(x (1, 1, 3), w (3, 3), b (1, 1, 3)) raises RuntimeError (its addmm path expands the "
        "bias to 2-D (rows, out)), while it computes x (1, 2, 3) with b (1, 2, 3)",
        "x Wᵀ + b with b broadcast to the output, on every path",
        "The result is well defined and torch computes it for other shapes of the same rank; the "
        "refusal depends on which internal kernel the shapes select.",
        "F.linear(torch.randn(1, 1, 3), torch.randn(3, 3), torch.randn(1, 1, 3))"),
    Difference(
        "linear: bool operands with no input features are refused", "linear", ("exception",), _bool_empty_linear,
        "F.linear of bool tensors with D_in = 0 raises RuntimeError ('result type Long can't be cast to the "
        "desired output type Bool') on its addmm path, but returns the bias on the paths that some layouts take "
        "(a 1-D input with an expanded weight and bias, a transposed ≥3-D input)",
        "RuntimeError, as torch's addmm path, for every layout",
        "A product of bool matrices is refused for every D_in > 0; whether D_in = 0 passes depends only on "
        "the strides, which choose torch's internal kernel.",
        "F.linear(torch.zeros(0, dtype=torch.bool), torch.ones(1, 0, dtype=torch.bool).expand(3, 0), "
        "torch.zeros(1, dtype=torch.bool).expand(3)) (torch: ok; contiguous operands or a 2-D input: RuntimeError)"),
    Difference(
        "adaptive_avg_pool2d: output (1, 1) follows the pooling rules", "adaptive_avg_pool2d", ("exception",),
        _adaptive_mean_path,
        "for output_size (1, 1) it returns input.mean((-1, -2)) instead of pooling: so that size alone accepts "
        "complex input and an empty H or W (a nan result), and refuses integer input with mean()'s RuntimeError "
        "where every other size gives NotImplementedError",
        "the rules of every other output size: floating input (NotImplementedError otherwise), H and W not empty "
        "(RuntimeError)",
        "The output size chooses the windows, not which inputs are valid; the (1, 1) exceptions are the "
        "accident of a shortcut.",
        "F.adaptive_avg_pool2d(torch.ones(1, 2, 3, dtype=torch.int32), 1) (RuntimeError; size 2: NotImplementedError)"),
    Difference(
        "adaptive_avg_pool2d: an empty output differentiates", "adaptive_avg_pool2d", ("backward",),
        _adaptive_empty_output,
        "an output size with a 0 computes the empty forward, then its backward raises RuntimeError: Expected "
        "grad_output to have non-zero size",
        "the forward, and its gradient: zeros of the input's shape (no output depends on any input)",
        "A forward torch accepts should be differentiable, and the gradient of an empty output is exactly zero; "
        "the refusal is a shape check of the backward kernel written for the forward's input.",
        "F.adaptive_avg_pool2d(torch.randn(1, 2, 3, requires_grad=True), 0).sum().backward()"),
    Difference(
        "avg_pool2d: int64 input refused", "avg_pool2d", ("exception",), _int64_input,
        "the CPU kernel accepts int64 (alone among the integer types: int32, uint8, bool raise "
        "NotImplementedError) and truncates each window's average to an integer",
        "NotImplementedError, as for every other non-floating dtype",
        "A truncated mean is not the average the op computes, and has no gradient; torch's own "
        "adaptive_avg_pool2d refuses int64.",
        "F.avg_pool2d(torch.ones(1, 1, 2, 2, dtype=torch.long), 2)"),
    Difference(
        "mean: keepdim without dim", "mean", ("exception",),
        lambda call: len(call.args) == 1 and "keepdim" in call.kwargs and "dim" not in call.kwargs,
        "torch.mean(x, keepdim=True) raises TypeError (no overload of its binding has keepdim without dim), "
        "though torch.mean(x, None, True) is accepted and means every dim",
        "every dim, as torch.mean(x, None, keepdim)",
        "One signature, mean(input, dim=None, keepdim=False, *, dtype=None): an omitted dim is dim=None, as "
        "written out; torch's refusal is its overload resolution, not a rule about the call.",
        "torch.mean(torch.ones(2, 3), keepdim=True)"),
    Difference(
        "embedding: sparse gradient of a 0-d index with padding_idx", "embedding", ("backward",),
        lambda call: call.kwargs.get("sparse") is True and call.kwargs.get("padding_idx") is not None
        and not call.args[0].shape,
        "its sparse backward masks the 0-d indices and the (D,) gradient with one 0-d mask: IndexError "
        "'too many indices for tensor of dimension 0'",
        "the sparse gradient, as for the same index in a 1-element tensor (no entry where it is padding_idx)",
        "A 0-d index is one row, and its forward is accepted; the backward's refusal is an accident of "
        "indexing the unflattened tensors.",
        "F.embedding(torch.tensor(1), torch.randn(3, 2, requires_grad=True), padding_idx=0, sparse=True).sum().backward()"),
)
