"""mean and mul against torch by name, on what the registry cases cannot express: every dtype a
call takes (``dtype=``, integer/bool/complex operands, type promotion across operands, 0-d and
number operands), equal to torch's values, dtypes and gradients exactly (the forward passes are
torch's evaluation, the backward formulas torch's rounding order), and forward mode on mixed
dtypes."""
from __future__ import annotations

import pytest
import torch

import handgrad.functional as F
from handgrad.testing.coverage import is_handgrad_node


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _grads(y, inputs, g):
    return torch.autograd.grad(y, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad], g)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"dim": 1}, {"dim": (0, -1), "keepdim": True}, {"dim": []},
                                {"dim": 2, "dtype": torch.float64}, {"dtype": torch.float16},
                                {"dim": -2, "dtype": torch.bfloat16}, {"dim": None, "keepdim": True}])
def test_mean_equals_torch_exactly(dtype, kw):
    x = torch.randn(7, 13, 5, dtype=torch.float64).to(dtype).requires_grad_()
    y, t = F.mean(x, **kw), torch.mean(x, **kw)
    _same(y, t)
    assert is_handgrad_node(y.grad_fn)
    g = torch.randn(t.shape, dtype=torch.float64).to(t.dtype)
    _same(*_grads(y, [x], g), *_grads(t, [x], g))


def test_mean_of_other_dtypes_and_edges():
    ints, flags = torch.arange(6).reshape(2, 3), torch.tensor([True, False, True])
    _same(F.mean(ints, 1, dtype=torch.float32), torch.mean(ints, 1, dtype=torch.float32))
    _same(F.mean(flags, dtype=torch.float16), torch.mean(flags, dtype=torch.float16))
    z = torch.randn(2, 3, dtype=torch.complex128, requires_grad=True)
    _same(F.mean(z, 0), torch.mean(z, 0))
    g = torch.randn(3, dtype=torch.complex128)
    _same(*_grads(F.mean(z, 0), [z], g), *_grads(torch.mean(z, 0), [z], g))
    for x in (torch.zeros(0, 3), torch.tensor(2.5)):               # empty: nan; 0-d: itself
        for dim in (None, 0, -1):
            _same(F.mean(x, dim), torch.mean(x, dim))
    with pytest.raises(RuntimeError, match="could not infer output dtype"):
        F.mean(ints)
    with pytest.raises(TypeError, match="keepdim"):
        F.mean(torch.ones(2), 0, 1)


def test_mean_double_backward_and_forward_mode():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: F.mean(t, (0, 2)), (x,))
    with torch.autograd.forward_ad.dual_level():
        dx = torch.randn_like(x)
        y = F.mean(torch.autograd.forward_ad.make_dual(x.detach(), dx), 1, True, dtype=torch.float32)
        tangent = torch.autograd.forward_ad.unpack_dual(y).tangent
    _same(tangent, torch.mean(dx, 1, True, dtype=torch.float32))


OPERANDS = [
    lambda: torch.randn(4, 5, dtype=torch.float64, requires_grad=True),
    lambda: torch.randn(5, dtype=torch.float32, requires_grad=True),          # broadcast, promoted
    lambda: torch.randn(4, 1, dtype=torch.float16, requires_grad=True),
    lambda: torch.tensor(1.5, dtype=torch.float64, requires_grad=True),       # 0-d: does not promote
    lambda: torch.randint(-3, 4, (4, 5)),                                     # integer: no gradient
    lambda: torch.rand(5) < 0.5,                                              # bool
    lambda: torch.randn(5, dtype=torch.complex64, requires_grad=True),        # complex: conj convention
    lambda: 0.37, lambda: 3, lambda: True, lambda: 0.5 - 2j,                  # numbers
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("other", range(len(OPERANDS)))
def test_mul_equals_torch_exactly(dtype, other):
    x = torch.randn(4, 5, dtype=torch.float64).to(dtype).requires_grad_()
    b = OPERANDS[other]()
    if dtype in (torch.float16, torch.bfloat16) and (isinstance(b, complex) or getattr(b, "is_complex", bool)()):
        pytest.skip("complex32 has too few kernels to compare")
    for args in ((x, b), (b, x)) if isinstance(b, torch.Tensor) else ((x, b),):
        y, t = F.mul(*args), torch.mul(*args)
        _same(y, t)
        assert is_handgrad_node(y.grad_fn)
        g = torch.randn(t.shape, dtype=torch.float64).to(t.dtype)
        for a, c in zip(_grads(y, args, g), _grads(t, args, g), strict=True):
            _same(a, c)
    _same(F.mul(2, x), torch.mul(2, x))                               # a number first, as torch takes


def test_mul_double_backward_and_forward_mode():
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(F.mul, (a, b))
    with torch.autograd.forward_ad.dual_level():
        da, db = torch.randn_like(a), torch.randn(4, dtype=torch.float32)
        y = F.mul(torch.autograd.forward_ad.make_dual(a.detach(), da),
                  torch.autograd.forward_ad.make_dual(b.detach().float(), db))
        tangent = torch.autograd.forward_ad.unpack_dual(y).tangent
    assert tangent.dtype == torch.float64
    torch.testing.assert_close(tangent, da * b.detach().float() + a.detach() * db, rtol=0, atol=0)


def test_mul_saves_only_what_its_gradient_reads():
    """As torch's MulBackward0: B where A needs a gradient, A where B does."""
    a, b = torch.randn(3, requires_grad=True), torch.randn(3)
    saved = F.mul(a, b).grad_fn.saved_tensors
    assert len(saved) == 2 and saved[0] is None and saved[1] is not None
