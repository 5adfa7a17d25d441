"""The checks of agreement with another computation of the same function: reference (the
reference in float64), lowp (low precision against a float64 truth, ``tolerances.LOWP_RULE``),
autocast (the dtypes torch gives under ``torch.autocast``), needs_grad (every gradient present, and
the same when one input alone requires grad) and noncontiguous (sliced and column-major layouts)."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..report import CheckResult
from ..tolerances import LOWP_RULE, allowed_lowp_error, term_scales
from .jacobians import outputs, outputs_and_grads
from .measure import first_lines, grad_label, locate, short, unravel
from .problem import Ctx, Unsupported


def check_reference(c: Ctx) -> CheckResult:
    if c.ref is None:
        return CheckResult("reference", "skip", "no reference given")
    v = c.grad_outputs()
    outs, grads = outputs_and_grads(c.f, c.leaves(), v)
    ref_outs, ref_grads = outputs_and_grads(c.ref, c.leaves(), v)
    w = c.worst("exact")
    c.compare(w, outs, grads, ref_outs, ref_grads)
    # Again with create_graph=True: the plain backward may take a fast path (fewer passes, in
    # place, grad mode off), this one the differentiable formula; both must equal the reference.
    _, graph_grads = outputs_and_grads(c.f, c.leaves(), v, create_graph=True)
    c.compare(w, outs, [None if g is None else g.detach() for g in graph_grads], ref_outs, ref_grads)
    return w.result("reference", "against the reference in float64")


def check_lowp(c: Ctx) -> CheckResult:
    p = c.problem
    if p.ref_at is None:
        return CheckResult("lowp", "skip", "no reference given: nothing to compare the low-precision error with")
    own = sorted({str(t.dtype) for t in p.inputs.diff})
    dtypes: list[torch.dtype | None] = list(c.options.lowp_dtypes) if c.options.lowp_dtypes else [None]
    if not c.options.lowp_dtypes and own == ["torch.float64"]:
        return CheckResult("lowp", "skip", "inputs are float64: no lower precision to compare "
                                           "(pass float32/bfloat16 inputs, or lowp_dtypes=...)")
    worst_excess = -math.inf
    worst: dict[str, Any] = {}
    notes, max_abs, max_rel, compared = [], 0.0, 0.0, []
    for dtype in dtypes:
        low = p.inputs if dtype is None else p.inputs.map(lambda t: t.to(dtype))
        name = str(dtype if dtype else "/".join(own)).replace("torch.", "")
        truth_in = low.map(lambda t: t.double())  # the truth on exactly the low-precision values
        v64 = c.grad_outputs()
        truth_out, truth_grads = outputs_and_grads(truth_in.bind(p.ref_at(torch.float64)), truth_in.diff, v64)
        try:
            their_out, their_grads = outputs_and_grads(low.bind(p.ref_at(dtype)), low.diff, v64)
        except RuntimeError as e:  # torch has no kernel for this dtype on this device
            notes.append(f"{name}: the reference refuses it ({first_lines(e, 1)}), not compared")
            continue
        our_out, our_grads = outputs_and_grads(low.bind(p.fn_at(dtype)), low.diff, v64)
        compared.append(name)
        terms = term_scales(c.options.lowp_terms, v64[0] if len(v64) == 1 else None, truth_in.args, truth_in.kwargs,
                            truth_in.diff)   # where a gradient's terms cancel (tolerances.TERM_SCALES)
        items = [(f"the {c.out_label(o)}", a, b, t, None) for o, (a, b, t) in enumerate(zip(our_out, their_out, truth_out))]
        items += [(grad_label(c.labels[i]), a, b, t, s)
                  for i, (a, b, t, s) in enumerate(zip(our_grads, their_grads, truth_grads, terms))]
        for subject, ours, theirs, truth, scale in items:
            if truth is None:
                continue
            if ours is None or theirs is None:  # a missing gradient is a zero one, in the dtype of the other
                like = theirs if ours is None else ours
                ours = torch.zeros_like(like) if ours is None else ours
                theirs = torch.zeros_like(like) if theirs is None else theirs
            if ours.dtype != theirs.dtype:
                raise AssertionError(f"{name}: {subject} has dtype {ours.dtype}, the reference gives {theirs.dtype}")
            eps = torch.finfo(ours.dtype).eps
            t = truth.detach().double()
            finite = t.isfinite()
            err = (ours.detach().double() - t).abs()
            ref_err = (theirs.detach().double() - t).abs()
            if not torch.equal(ours.detach().double().isfinite(), finite):
                raise AssertionError(f"{name}: {subject} is non-finite where the float64 truth is finite (or the reverse)")
            allowed = allowed_lowp_error(ref_err, t, eps, c.options.lowp_ulps, scale)       # STYLE.md §7
            excess = torch.where(finite, err - allowed, -math.inf).reshape(-1)
            if excess.numel() == 0:
                continue
            max_abs = max(max_abs, err[finite].max().item() if finite.any() else 0.0)
            max_rel = max(max_rel, (err / t.abs().clamp_min(eps))[finite].max().item() if finite.any() else 0.0)
            k = int(excess.argmax())
            if excess[k].item() > worst_excess:
                worst_excess = excess[k].item()
                idx = unravel(k, t.shape)
                worst = dict(dtype=name, subject=subject, idx=idx, err=err.reshape(-1)[k].item(),
                             got=ours.detach().double().reshape(-1)[k].item(), truth=t.reshape(-1)[k].item(),
                             ref_err=ref_err[finite].max().item(), allowed=allowed.reshape(-1)[k].item(),
                             where=f"{short(subject.replace('the gradient of ', '').replace('the ', ''))}"
                                   f"[{', '.join(map(str, idx))}] ({name})")
    if not compared:
        return CheckResult("lowp", "skip", "; ".join(notes))
    tol = LOWP_RULE.replace("ulps", f"{c.options.lowp_ulps:g}")
    result = CheckResult("lowp", "pass", "\n".join(notes), max_abs, max_rel, where=worst.get("where"), tolerance=tol)
    if worst_excess > 0:
        result.status = "fail"
        result.subject, result.index = worst["subject"], worst["idx"]
        result.got, result.expected = worst["got"], worst["truth"]
        result.message = "\n".join([
            f"in {worst['dtype']}, {worst['subject']} is less accurate than the reference's: at {worst['where']} "
            f"|ours − truth| = {worst['err']:.3g}, max|reference − truth| = {worst['ref_err']:.3g}, allowed {worst['allowed']:.3g} "
            f"(exceeded by {worst_excess:.3g}); allowed {tol}", *notes])
    return result


def check_needs_grad(c: Ctx) -> CheckResult:
    v = c.grad_outputs()
    _, grads = outputs_and_grads(c.f, c.leaves(), v)
    if c.ref is not None:
        _, expected = outputs_and_grads(c.ref, c.leaves(), v)
        source = "the reference's"
    else:  # Jᵀ v from finite differences
        J = c.jac_numerical()
        expected = [sum((J[o][i].mT @ v[o].reshape(-1)) for o in range(len(v))).reshape(x.shape)
                    if v else None for i, x in enumerate(c.diff)]
        source = "finite differences give"
    w = c.worst("exact")
    fd_w = c.worst("fd")
    problems = []
    for i, (g, e) in enumerate(zip(grads, expected)):
        big = 0.0 if e is None else e.detach().abs().max().item() if e.numel() else 0.0
        threshold = fd_w.atol if c.ref is None else w.atol  # what counts as "non-zero" for that truth
        if big > threshold and (g is None or not bool(g.detach().abs().max() > 0)):
            what = "None" if g is None else "all zero"
            problems.append(f"the gradient of {c.labels[i]} is {what}, but {source} max |∂L/∂{short(c.labels[i])}| = {big:.3g}")
    # Each input alone requiring grad: the same gradient as when all do (needs_input_grad branches).
    for i in range(len(c.diff)):
        xs = [x.clone().requires_grad_(k == i) for k, x in enumerate(c.diff)]
        try:
            _, alone = outputs_and_grads(c.f, xs, v)
        except Exception as e:  # noqa: BLE001 - backward crashed on a needs_input_grad branch
            problems.append(f"with only {c.labels[i]} requiring grad, fn or its backward raised {type(e).__name__}: "
                            f"{first_lines(e)}")
            continue
        a = torch.zeros_like(c.diff[i]) if alone[i] is None else alone[i]
        b = torch.zeros_like(c.diff[i]) if grads[i] is None else grads[i]
        w.add(a, b, f"the gradient of {c.labels[i]} when it alone requires grad",
              locate(c.diff[i].shape, f"{short(c.labels[i])} (alone)"))
    result = w.result("needs_grad", "vs every input requiring grad")
    if problems:
        result.status = "fail"
        result.message = "\n".join([*problems, result.message] if result.message else problems)
    return result


def sliced(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view: a slice of a wider tensor (rows D + 1 apart, so
    no ``view(-1)`` exists), or every other element for a 1-D tensor."""
    if t.dim() == 0:
        return t
    if t.dim() == 1:
        wide = torch.zeros(2 * t.shape[0], dtype=t.dtype, device=t.device)
        wide[::2] = t
        return wide[::2]
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype, device=t.device)
    wide[..., :-1] = t
    return wide[..., :-1]


def transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values stored column-major (the layout of ``weight.mT``)."""
    return t.mT.contiguous().mT if t.dim() >= 2 else t


def check_noncontiguous(c: Ctx) -> CheckResult:
    v = c.grad_outputs()
    outs, grads = outputs_and_grads(c.f, c.leaves(), v)
    w = c.worst("exact")
    for layout, make in (("sliced", sliced), ("column-major", transposed)):
        moved = c.x64.map(make)  # every floating tensor, differentiable or not
        try:
            s_outs, s_grads = outputs_and_grads(moved.bind(c.problem.fn_at(torch.float64)), moved.diff, [make(t) for t in v])
        except Exception as e:  # noqa: BLE001 - fn refuses a layout torch accepts: that is the verdict
            raise AssertionError(f"with {layout} inputs and output gradient, {type(e).__name__}: {first_lines(e)}") from e
        c.compare(w, s_outs, s_grads, outs, grads)
    return w.result("noncontiguous", "non-contiguous (sliced, column-major) vs contiguous inputs and output gradient")


# torch.autocast's lower dtype per device type: the one each device's autocast is used with
AUTOCAST_DTYPES = {"cpu": torch.bfloat16, "cuda": torch.float16}


def check_autocast(c: Ctx) -> CheckResult:
    """Under ``torch.autocast`` on float32 copies of the inputs: each output has the dtype the
    reference's has, and each gradient exists where the reference's does, in its input's dtype."""
    p = c.problem
    if p.ref_at is None:
        return CheckResult("autocast", "skip", "no reference given: nothing says which dtypes autocast gives")
    device = c.device.type
    if device not in AUTOCAST_DTYPES:
        return CheckResult("autocast", "skip", f"no autocast dtype known for device type {device!r}")
    low = AUTOCAST_DTYPES[device]
    x32 = p.inputs.map(lambda t: t.to(torch.float32))
    under = f"under torch.autocast({device!r}, dtype={low})"

    def run(make, who):
        xs = [t.detach().clone().requires_grad_(True) for t in x32.diff]
        try:
            with torch.autocast(device, dtype=low):
                outs = outputs(x32.bind(make(torch.float32))(*xs))
            connected = [o.float().sum() for o in outs if o.requires_grad]
            grads = torch.autograd.grad(connected, xs, allow_unused=True) if connected else [None] * len(xs)
        except Exception as e:  # noqa: BLE001 - e.g. a backward that multiplies a float16 G by a float32 X
            if who == "the reference":
                raise
            raise Unsupported(f"{under}, fn or its backward raised {type(e).__name__}: {first_lines(e)}") from e
        return outs, grads, xs

    (outs, grads, xs), (ref_outs, ref_grads, _) = run(p.fn_at, "fn"), run(p.ref_at, "the reference")
    problems = []
    if len(outs) != len(ref_outs):
        problems.append(f"fn returns {len(outs)} floating-point outputs, the reference {len(ref_outs)}")
    for o, (a, b) in enumerate(zip(outs, ref_outs)):
        if a.dtype != b.dtype:
            problems.append(f"the {c.out_label(o)} has dtype {a.dtype}, the reference's {b.dtype}")
    for i, (g, r, x) in enumerate(zip(grads, ref_grads, xs)):
        if (g is None) != (r is None):
            problems.append(f"the gradient of {c.labels[i]} is {'None' if g is None else 'a tensor'}, "
                            f"the reference's {'None' if r is None else 'a tensor'}")
        elif g is not None and not g.dtype == r.dtype == x.dtype:
            problems.append(f"the gradient of {c.labels[i]} has dtype {g.dtype}, the reference's {r.dtype}, "
                            f"the input's {x.dtype}")
    if problems:  # autocast support is a feature: a skip naming what differs, a failure when strict
        raise Unsupported(f"{under}: " + "; ".join(problems))
    return CheckResult("autocast", "pass", tolerance="the reference's dtypes")
