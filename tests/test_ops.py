"""Every op in the registry (handgrad.testing.registry), checked the same way:
gradcheck/gradgradcheck in float64 (batched, forward-mode, forward-over-reverse), parity with
torch in float64 and in low precision (STYLE.md §7), torch.func, autocast, bad inputs."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from conftest import DEVICES
from handgrad.testing.registry import LOWP_RULE, all_cases, allowed_lowp_error

CASES = all_cases()
SHAPED = [pytest.param(c, s, id=c.id(s)) for c in CASES for s in c.shapes]
NONEMPTY = [p for p in SHAPED if all(d > 0 for d in p.values[1])]
FIRST = [pytest.param(c, c.shapes[0], id=c.name) for c in CASES]


def _outputs_and_grads(fn, inputs, grad_out=None):
    """Output of ``fn`` and the gradients of every differentiable input for ``grad_out``."""
    out = inputs.bind(fn)(*inputs.diff)
    if grad_out is None:
        grad_out = torch.randn_like(out, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, inputs.diff, grad_out, allow_unused=True) if out.requires_grad else ()
    return out, grads, grad_out


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values, in a non-contiguous view (every other element of a wider tensor)."""
    if t.dim() == 0:
        return t
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,shape", SHAPED)
def test_gradcheck(case, shape, device):
    inputs = case.inputs(shape, torch.float64, device)
    fn = inputs.bind(case.fn)
    assert gradcheck(fn, inputs.diff, check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True)
    assert gradgradcheck(fn, inputs.diff, check_batched_grad=True, check_fwd_over_rev=True)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("case,shape", SHAPED)
def test_parity_float64(case, shape, layout):
    inputs = case.inputs(shape)
    if layout == "strided":
        inputs = inputs.map(_strided)
    out, grads, g = _outputs_and_grads(case.fn, inputs)
    ref, ref_grads, _ = _outputs_and_grads(case.reference, inputs, _strided(g) if layout == "strided" else g)
    # float64 tolerances: assert_close's defaults (rtol 1e-7, atol 1e-7): only summation order differs.
    # NaN where torch gives NaN (a mean over an empty batch) counts as equal.
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert len(grads) == len(ref_grads)
    for i, (ours, theirs) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(ours, theirs, equal_nan=True, msg=lambda m: f"gradient of differentiable input {i}: {m}")


def _lowp_check(name, ours, theirs, truth, dtype, ulps):
    """STYLE.md §7 through the registry's one rule, ``LOWP_RULE``."""
    assert ours.dtype == theirs.dtype == dtype, f"{name}: dtype {ours.dtype}, torch gives {theirs.dtype}"
    truth = truth.double()
    finite = truth.isfinite()
    assert torch.equal(ours.double().isfinite(), finite), f"{name}: non-finite values where truth is finite (or the reverse)"
    err, ref_err = (ours.double() - truth).abs(), (theirs.double() - truth).abs()
    excess = (err - allowed_lowp_error(ref_err, truth, torch.finfo(dtype).eps, ulps))[finite]
    assert excess.numel() == 0 or excess.max() <= 0, (
        f"{name}: {LOWP_RULE} (ulps={ulps}) broken by {excess.max().item():.3g} (at flat index {excess.argmax().item()})"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case,shape", NONEMPTY)
def test_parity_low_precision(case, shape, dtype):
    if dtype not in case.lowp_dtypes:
        pytest.skip(f"{case.name} is not checked in {dtype}")
    truth_inputs = case.inputs(shape)
    low = truth_inputs.map(lambda t: t.to(dtype))
    truth_inputs = low.map(lambda t: t.double())  # truth on exactly the low-precision values
    truth, truth_grads, g = _outputs_and_grads(case.reference, truth_inputs)
    try:
        theirs, their_grads, _ = _outputs_and_grads(case.reference, low, g.to(dtype))
    except RuntimeError as e:  # torch has no kernel for this dtype on this device
        pytest.skip(f"torch refuses {dtype}: {e}")
    ours, our_grads, _ = _outputs_and_grads(case.fn, low, g.to(dtype))
    _lowp_check("output", ours, theirs, truth, dtype, case.lowp_ulps)
    for i, (a, b, t) in enumerate(zip(our_grads, their_grads, truth_grads)):
        _lowp_check(f"gradient of input {i}", a, b, t, dtype, case.lowp_ulps)


@pytest.mark.parametrize("case,shape", FIRST)
def test_torch_func(case, shape):
    inputs = case.inputs(shape)
    ours, ref = inputs.bind(case.fn), inputs.bind(case.reference)
    argnums = tuple(range(len(inputs.diff)))
    diff = tuple(t.detach() for t in inputs.diff)
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(transform(ours, argnums=argnums)(*diff), transform(ref, argnums=argnums)(*diff))
    stacked = torch.stack([diff[0], diff[0] * 0.5, -diff[0]])
    in_dims = (0,) + (None,) * (len(diff) - 1)
    torch.testing.assert_close(
        torch.func.vmap(ours, in_dims=in_dims)(stacked, *diff[1:]), torch.func.vmap(ref, in_dims=in_dims)(stacked, *diff[1:])
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,shape", FIRST)
def test_autocast(case, shape, device):
    """Under autocast: the output dtype torch gives, gradients in each input's own dtype."""
    inputs = case.inputs(shape, torch.float32, device)
    low = torch.bfloat16 if device == "cpu" else torch.float16
    results = []
    for fn in (case.fn, case.reference):
        with torch.autocast(device, dtype=low):
            out = inputs.bind(fn)(*inputs.diff)
        grads = torch.autograd.grad(out.float().sum(), inputs.diff, allow_unused=True)
        results.append((out, grads))
    (ours, our_grads), (ref, ref_grads) = results
    assert ours.dtype == ref.dtype
    for a, b, x in zip(our_grads, ref_grads, inputs.diff):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype == x.dtype


BAD = [pytest.param(c, b, id=f"{c.name}-{b.what}") for c in CASES for b in c.bad_inputs]


@pytest.mark.parametrize("case,bad", BAD)
def test_bad_input(case, bad):
    """The exception type torch raises for the same call, and a message naming the argument."""
    inputs = bad.make()
    with pytest.raises(Exception) as theirs:
        case.reference(*inputs.args, **inputs.kwargs)
    with pytest.raises(theirs.type) as ours:
        case.fn(*inputs.args, **inputs.kwargs)
    for name in bad.names:
        assert name in str(ours.value), f"message {str(ours.value)!r} does not name {name!r}"
