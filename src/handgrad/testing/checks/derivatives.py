"""The checks against derivatives computed another way: gradcheck, gradgradcheck, forward_ad
(each against central finite differences) and torch_func (``torch.func.jacrev`` and ``jacfwd``
against the reference's Jacobian, or finite differences without one). Each returns a
``CheckResult`` (the runner adds the time) or raises ``Unsupported``."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from ..report import CheckResult
from .jacobians import compare_jacobians, jac_numerical, jac_reverse, outputs, outputs_and_grads
from .measure import first_lines, short
from .problem import VMAP_UNSUPPORTED, Ctx, Unsupported


def check_gradcheck(c: Ctx) -> CheckResult:
    f = c.flat(c.f)
    J_rev, no_graph = jac_reverse(f, c.diff)
    J_num = c.jac_numerical()
    w = c.worst("fd")
    out_labels = [c.out_label(o) for o in range(len(J_num))]
    compare_jacobians(w, J_rev, J_num, out_labels, c.out_shapes, c.labels, [x.shape for x in c.diff],
                       lambda o, i: f"the gradient of {c.labels[i]}" + (f" (from {out_labels[o]})" if len(out_labels) > 1 else ""))
    notes = [f"{out_labels[o]} does not require grad: fn's output is not connected to its inputs" for o in no_graph]
    result = w.result("gradcheck", "backward vs finite differences", notes)
    if result.status == "pass":  # torch's own gradcheck, for what a Jacobian comparison cannot see
        try:
            torch.autograd.gradcheck(f, tuple(c.leaves()), fast_mode=True, check_undefined_grad=True,
                                     atol=w.atol, rtol=w.rtol, raise_exception=True)
        except Exception as e:  # noqa: BLE001 - GradcheckError or an error raised by backward
            result.status, result.message = "fail", f"torch.autograd.gradcheck: {first_lines(e)}"
    return result


def check_gradgradcheck(c: Ctx) -> CheckResult:
    """The Jacobian of g(x, G) = ∂L/∂x (L = Σ⟨out, G⟩) by reverse mode vs finite differences."""
    n = len(c.diff)
    v = c.grad_outputs()
    detached: list[int] = []

    def g(*xs_vs):
        xs, vs = xs_vs[:n], xs_vs[n:]
        _, grads = outputs_and_grads(c.f, xs, vs, create_graph=True)
        out = []
        for i, (gr, x) in enumerate(zip(grads, xs)):
            if gr is None:
                gr = torch.zeros_like(x)
            elif (not gr.requires_grad or type(gr.grad_fn).__name__ == "Error") and i not in detached:
                detached.append(i)  # no graph, or once_differentiable's Error node
            out.append(gr)
        return out

    xs = [*c.diff, *v]
    in_labels = [*c.labels, *[f"grad_{c.out_label(o)}" for o in range(len(v))]]
    J_rev, _ = jac_reverse(g, xs)
    J_num = jac_numerical(g, xs)
    w = c.worst("fd")
    out_labels = [f"grad_{short(label)}" for label in c.labels]
    compare_jacobians(w, J_rev, J_num, out_labels, [x.shape for x in c.diff], in_labels, [x.shape for x in xs],
                       lambda o, i: f"the derivative of the gradient of {c.labels[o]} with respect to {in_labels[i]}")
    notes = [f"the gradient of {c.labels[i]}, computed with create_graph=True, has no graph to differentiate: "
             "backward is not differentiable (@once_differentiable, or .detach(), .item(), .numpy() or "
             "torch.no_grad inside backward)"
             for i in sorted(detached) if (J_num[i] and any(b.abs().max() > w.atol for b in J_num[i] if b.numel()))]
    result = w.result("gradgradcheck", "double backward vs finite differences", notes)
    if result.status == "pass":  # forward-over-reverse: the jvp of the backward (torch's own check)
        try:
            torch.autograd.gradgradcheck(c.flat(c.f), tuple(c.leaves()), fast_mode=True, check_fwd_over_rev=True,
                                         atol=w.atol, rtol=w.rtol, raise_exception=True)
        except NotImplementedError as e:  # the backward calls a Function without a jvp
            if c.strict:
                raise Unsupported(f"forward-over-reverse: {first_lines(e)}") from e
            result.message = "\n".join(filter(None, [result.message, f"forward-over-reverse not checked: {first_lines(e, 1)}"]))
        except Exception as e:  # noqa: BLE001 - GradcheckError or an error raised by the double backward
            result.status, result.message = "fail", f"torch.autograd.gradgradcheck (forward-over-reverse): {first_lines(e)}"
    return result


def check_forward_ad(c: Ctx) -> CheckResult:
    J_num = c.jac_numerical()
    J_fwd = [[torch.zeros_like(b) for b in row] for row in J_num]
    for i, x in enumerate(c.diff):
        for j in range(x.numel()):
            tangent = torch.zeros_like(x)
            tangent.view(-1)[j] = 1.0
            try:
                with fwAD.dual_level():
                    args = [fwAD.make_dual(x, tangent) if k == i else c.diff[k] for k in range(len(c.diff))]
                    outs = outputs(c.f(*args))
                    tangents = [fwAD.unpack_dual(o).tangent for o in outs]
            except NotImplementedError as e:
                raise Unsupported(f"forward-mode AD is not implemented: {first_lines(e)}") from e
            for o, t in enumerate(tangents):
                if t is not None:
                    J_fwd[o][i][:, j] = t.detach().double().reshape(-1)
    w = c.worst("fd")
    compare_jacobians(w, J_fwd, J_num, [c.out_label(o) for o in range(len(J_num))], c.out_shapes, c.labels,
                       [x.shape for x in c.diff], lambda o, i: f"the forward-mode derivative with respect to {c.labels[i]}")
    return w.result("forward_ad", "forward-mode AD (jvp) vs finite differences")


def check_torch_func(c: Ctx) -> CheckResult:
    """``torch.func.jacrev`` (vmap over vjp) and ``jacfwd`` (vmap over jvp) of fn equal the
    reference's ``jacrev`` in float64, or finite differences when there is no reference."""
    n = len(c.diff)
    argnums = tuple(range(n))

    def as_blocks(jac) -> list[list[torch.Tensor]]:  # jac[o][i] (*out, *in) → (out.numel(), in.numel())
        return [[jac[o][i].reshape(max(s.numel(), 0), x.numel()) for i, x in enumerate(c.diff)]
                for o, s in enumerate(c.out_shapes)]

    def tupled(f):
        return lambda *xs: tuple(outputs(f(*xs)))

    expected, notes = None, []
    if c.ref is not None:
        try:
            expected, w, source = as_blocks(torch.func.jacrev(tupled(c.ref), argnums=argnums)(*c.diff)), c.worst("exact"), \
                "the reference's jacrev"
        except RuntimeError as e:  # torch's own op has no rule for this call (F.linear with a 3-D bias)
            notes.append(f"the reference's jacrev raised {type(e).__name__} ({first_lines(e, 1)}): "
                         "compared with finite differences")
    if expected is None:
        expected, w, source = c.jac_numerical(), c.worst("fd"), "finite differences"
    out_labels = [c.out_label(o) for o in range(len(c.out_shapes))]
    for name, transform in (("jacrev", torch.func.jacrev), ("jacfwd", torch.func.jacfwd)):
        try:
            got = as_blocks(transform(tupled(c.f), argnums=argnums)(*c.diff))
        except NotImplementedError as e:
            raise Unsupported(f"torch.func.{name}: {first_lines(e)}") from e
        except RuntimeError as e:
            if any(s in str(e) for s in VMAP_UNSUPPORTED):
                raise Unsupported(f"torch.func.{name}: {first_lines(e)}") from e
            raise
        compare_jacobians(w, got, expected, out_labels, c.out_shapes, c.labels, [x.shape for x in c.diff],
                          lambda o, i, name=name: f"torch.func.{name}'s derivative with respect to {c.labels[i]}")
    return w.result("torch_func", f"torch.func.jacrev and jacfwd vs {source}", notes)
