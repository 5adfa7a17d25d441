r"""Check a backward pass thoroughly: ``check_function``, ``check_module``, ``assert_gradients_match``.

Every check runs on float64 copies of the inputs (whatever their dtype), except ``lowp``, which
runs in the inputs' own dtype (or ``lowp_dtypes``) against a float64 truth, and ``autocast``. The
checks (``ALL``, in this order):

==============  ==========================================================================
gradcheck       the reverse-mode Jacobian (one backward per output element) equals central
                finite differences; then ``torch.autograd.gradcheck`` (fast mode, undefined
                output gradients) for what a Jacobian comparison cannot see
gradgradcheck   the backward is itself differentiable: the Jacobian of
                (inputs, G) ↦ ∂L/∂inputs by reverse mode equals finite differences; then
                ``torch.autograd.gradgradcheck`` with forward-over-reverse
forward_ad      the forward-mode Jacobian (``torch.autograd.forward_ad``, one tangent per input
                element) equals finite differences
vmap            ``torch.func.vmap`` of the forward, batched gradients (``is_grads_batched``) and
                per-sample gradients (``vmap`` of ``torch.func.vjp``) equal a Python loop
compile         ``torch.compile(fn, backend=compile_backend)`` gives the eager outputs and gradients
reference       outputs and gradients equal ``reference``'s (any autograd callable computing the
                same function), in float64
lowp            in the inputs' own dtype (or each of ``lowp_dtypes``): ``tolerances.LOWP_RULE``,
                truth = reference in float64 on the same low-precision values (STYLE.md §7)
needs_grad      no input that requires grad gets a None or all-zero gradient where the truth is
                non-zero, and each input's gradient is the same when it alone requires grad
                (a backward that skips or mishandles a ``ctx.needs_input_grad`` branch)
noncontiguous   sliced (rows D + 1 apart) and column-major inputs and output gradients give the
                same outputs and gradients as contiguous ones
torch_func      ``torch.func.jacrev`` (vmap over vjp) and ``jacfwd`` (vmap over jvp) equal the
                reference's Jacobian (finite differences without a reference)
autocast        under ``torch.autocast`` (bfloat16 on CPU, float16 on CUDA) on float32 inputs, the
                outputs have the reference's dtypes and the gradients their inputs' dtypes
bad_inputs      each of ``bad_inputs`` (calls torch refuses) raises the reference's exception
                type, with a message naming the argument and the shapes
inplace         ``out.mul_(2)`` on each output before the backward works wherever it works on the
                reference's output, with the same gradients (an output that is a view made
                inside a custom Function breaks every in-place layer after it)
==============  ==========================================================================

The tolerances and their reasons are ``handgrad.testing.tolerances``; the options
(``atol``/``rtol`` replace both float64 kinds) are ``CheckOptions``.

A feature ``fn`` does not implement (an autograd.Function without ``jvp``, without vmap support,
or one Dynamo cannot trace in one graph) is reported as a ``skip`` naming what is missing, or a
``fail`` when ``strict=True`` (handgrad's own ops are checked strictly).

Layout: ``measure`` (error measurement), ``jacobians`` (Jacobian engines), ``labels`` (input
labelling), ``problem`` (the shared run), the checks (``derivatives``, ``transforms``,
``agreement``, ``bad_inputs``, ``inplace``), ``runner`` and ``api`` (the public functions).
"""
from .api import (GradientCheckError, applies, assert_gradients_match, check_case, check_function, check_module,
                  representative_shape)
from .options import CheckOptions
from .runner import ALL

__all__ = ["ALL", "CheckOptions", "check_function", "check_module", "assert_gradients_match", "GradientCheckError",
           "check_case", "representative_shape", "applies"]
