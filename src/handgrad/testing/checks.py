r"""Check a backward pass thoroughly: ``check_function``, ``check_module``, ``assert_gradients_match``.

Every check runs on float64 copies of the inputs (whatever their dtype), except ``lowp``, which
runs in the inputs' own dtype (or ``lowp_dtypes``) against a float64 truth. The checks (``ALL``):

==============  ==========================================================================
gradcheck       the reverse-mode Jacobian (one backward per output element) equals central
                finite differences; then ``torch.autograd.gradcheck`` (fast mode, undefined
                output gradients) for what a Jacobian comparison cannot see
gradgradcheck   the backward is itself differentiable: the Jacobian of
                (inputs, G) ↦ ∂L/∂inputs by reverse mode equals finite differences
forward_ad      the forward-mode Jacobian (``torch.autograd.forward_ad``, one tangent per input
                element) equals finite differences
vmap            ``torch.func.vmap`` of the forward, batched gradients (``is_grads_batched``) and
                per-sample gradients (``vmap`` of ``torch.func.vjp``) equal a Python loop
compile         ``torch.compile(fn, backend=compile_backend)`` (default ``"aot_eager"``: it traces
                the forward and backward graphs as inductor does, without generating kernels, so it
                is fast) gives the eager outputs and gradients
reference       outputs and gradients equal ``reference``'s (any autograd callable computing the
                same function), in float64
lowp            in the inputs' own dtype (or each of ``lowp_dtypes``): STYLE.md §7,
                ``registry.LOWP_RULE``, truth = reference in float64 on the same low-precision
                values
needs_grad      no input that requires grad gets a None or all-zero gradient where the truth is
                non-zero, and each input's gradient is the same when it alone requires grad
                (a backward that skips or mishandles a ``ctx.needs_input_grad`` branch)
noncontiguous   sliced (rows D + 1 apart) and column-major inputs and output gradients give the
                same outputs and gradients as contiguous ones
==============  ==========================================================================

Tolerances (``atol``/``rtol`` replace both kinds when given):

- against finite differences (gradcheck, gradgradcheck, forward_ad): atol 1e-5, rtol 1e-3,
  torch.autograd.gradcheck's defaults. Central differences with eps 1e-6 in float64 are off by
  O(eps²·f''') plus rounding O(1e-16/eps) ≈ 1e-10; the margin leaves room for curvature.
- between two exact computations of the same float64 quantity (reference, vmap, compile,
  noncontiguous, needs_grad): atol 1e-7, rtol 1e-7, torch.testing.assert_close's float64
  defaults: only the order of summation differs.

A feature ``fn`` does not implement (an autograd.Function without ``jvp``, without vmap support,
or one Dynamo cannot trace in one graph) is reported as a ``skip`` naming what is missing, or a
``fail`` when ``strict=True`` (handgrad's own ops are checked strictly).
"""
from __future__ import annotations

import copy
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.autograd.forward_ad as fwAD

from .registry import LOWP_RULE, Inputs, OpCase, Shape, allowed_lowp_error
from .report import CheckResult, Report

__all__ = ["ALL", "check_function", "check_module", "assert_gradients_match", "GradientCheckError", "check_case",
           "representative_shape"]

ALL: tuple[str, ...] = ("gradcheck", "gradgradcheck", "forward_ad", "vmap", "compile", "reference", "lowp",
                        "needs_grad", "noncontiguous")

# See the module docstring for the reason of each.
FD_ATOL, FD_RTOL = 1e-5, 1e-3          # against finite differences: torch.autograd.gradcheck's defaults
EXACT_ATOL, EXACT_RTOL = 1e-7, 1e-7    # two float64 computations of one quantity: assert_close's defaults
FD_EPS = 1e-6                          # central-difference step (torch.autograd.gradcheck's)


class GradientCheckError(AssertionError):
    """Raised by ``assert_gradients_match``; ``.report`` holds the full ``Report``."""

    def __init__(self, report: Report):
        super().__init__("\n" + str(report))
        self.report = report


class _Unsupported(Exception):
    """fn lacks a feature (jvp, vmap rule, one Dynamo graph): skip, or fail when strict."""


# ---------------------------------------------------------------------------------------------
# Measuring errors


@dataclass
class _Worst:
    """The running worst mismatch over every comparison one check makes."""

    atol: float
    rtol: float
    max_abs: float = 0.0
    max_rel: float = 0.0
    ratio: float = -1.0                # worst |got − expected| / (atol + rtol|expected|); > 1 fails
    subject: str | None = None
    index: list[int] | None = None
    where: str | None = None
    got: float | None = None
    expected: float | None = None
    compared: bool = False

    def add(self, got: torch.Tensor, expected: torch.Tensor, subject: str,
            where: Callable[[int], tuple[list[int], str]]) -> None:
        """Compare two tensors of the same number of elements; ``where(k)`` locates flat index k."""
        self.compared = True
        a, e = got.detach().double().reshape(-1).cpu(), expected.detach().double().reshape(-1).cpu()
        if a.numel() == 0:
            return
        both_nan = a.isnan() & e.isnan()
        same_inf = a.isinf() & (a == e)
        diff = torch.where(both_nan | same_inf, 0.0, (a - e).abs()).nan_to_num(nan=math.inf)
        allowed = self.atol + self.rtol * e.abs().nan_to_num(nan=0.0, posinf=math.inf)
        ratio = torch.where(diff == 0, 0.0, diff / allowed)
        rel = diff / e.abs().clamp_min(self.atol if self.atol > 0 else torch.finfo(torch.float64).tiny)
        self.max_abs = max(self.max_abs, diff.max().item())
        self.max_rel = max(self.max_rel, rel.nan_to_num(nan=math.inf).max().item())
        k = int(ratio.argmax())
        if ratio[k].item() > max(self.ratio, 0.0):  # an exact match locates nothing
            self.ratio = ratio[k].item()
            self.index, self.where = where(k)
            self.subject, self.got, self.expected = subject, a[k].item(), e[k].item()

    @property
    def failed(self) -> bool:
        return self.ratio > 1

    def tolerance(self) -> str:
        return f"|got − expected| ≤ {self.atol:g} + {self.rtol:g}·|expected|"

    def describe(self, what: str) -> str:
        off = abs(self.got - self.expected)
        return (f"{what}: {self.subject} is wrong at {self.where}: got {self.got:.6g}, expected {self.expected:.6g}, "
                f"off by {off:.3g} (relative {off / max(abs(self.expected), self.atol):.3g}; allowed {self.tolerance()}); "
                f"largest error anywhere {self.max_abs:.3g}")

    def result(self, name: str, what: str, notes: Iterable[str] = ()) -> CheckResult:
        notes = [n for n in notes if n]
        if self.failed:
            status, message = "fail", "\n".join([self.describe(what), *notes])
        else:
            status, message = "pass", "\n".join(notes)
        failed = self.failed
        return CheckResult(name, status, message, self.max_abs if self.compared else None,
                           self.max_rel if self.compared else None, self.subject if failed else None,
                           self.index if failed else None, self.where, self.got if failed else None,
                           self.expected if failed else None, self.tolerance())


def _unravel(k: int, shape: Sequence[int]) -> list[int]:
    idx = []
    for d in reversed(list(shape)):
        idx.append(k % d if d else 0)
        k = k // d if d else 0
    return idx[::-1]


def _at(shape: Sequence[int], name: str) -> Callable[[int], tuple[list[int], str]]:
    """Locate flat index k of a tensor of ``shape`` named ``name``: ``weight[2, 0]``."""

    def where(k: int) -> tuple[list[int], str]:
        idx = _unravel(k, shape)
        return idx, f"{name}[{', '.join(map(str, idx))}]" if idx else name

    return where


def _at_jac(out_shape: Sequence[int], out_name: str, in_shape: Sequence[int], in_name: str):
    """Locate flat index k of a Jacobian block (out.numel(), in.numel()): ``∂output[3]/∂weight[2, 0]``."""
    n_in = max(math.prod(in_shape), 1)

    def where(k: int) -> tuple[list[int], str]:
        o, i = _unravel(k // n_in, out_shape), _unravel(k % n_in, in_shape)
        fmt = lambda n, ix: f"{n}[{', '.join(map(str, ix))}]" if ix else n  # noqa: E731
        return o + i, f"∂{fmt(out_name, o)}/∂{fmt(in_name, i)}"

    return where


# ---------------------------------------------------------------------------------------------
# The problem: fn as a function of its differentiable tensors


def _outputs(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of fn's output (a tensor, or any nesting of tuples/lists/dicts)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _outputs(o)]
    return []


def _as_callable(fn: Any) -> Callable:
    """An autograd.Function class becomes its ``call`` (handgrad's HandFunction) or ``apply``."""
    if isinstance(fn, type) and issubclass(fn, torch.autograd.Function):
        return getattr(fn, "call", fn.apply)
    return fn


def _param_names(fn: Any) -> list[str] | None:
    target = fn.forward if isinstance(fn, type) and issubclass(fn, torch.autograd.Function) else fn
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return None
    if isinstance(fn, type) and issubclass(fn, torch.autograd.Function) and params and params[0].name == "ctx" \
            and fn.setup_context is torch.autograd.Function.setup_context:
        params = params[1:]  # old-style forward(ctx, ...)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    return [p.name for p in params]


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}{' requires_grad' if t.requires_grad else ''}" \
               f"{'' if t.is_contiguous() else ' non-contiguous'}"
    return repr(t) if len(repr(t)) < 40 else type(t).__name__


@dataclass
class _Problem:
    """What the checks need: fn and reference at a dtype, the inputs, and a label per input."""

    name: str
    fn_at: Callable[[torch.dtype | None], Callable]           # dtype None: as given
    ref_at: Callable[[torch.dtype | None], Callable] | None
    inputs: Inputs                                             # as given; diff tensors require grad
    labels: list[str]                                          # one per differentiable tensor
    arg_lines: list[str]


@dataclass
class _Ctx:
    """The float64 run every check shares (computed once, lazily)."""

    problem: _Problem
    atol: float | None
    rtol: float | None
    strict: bool
    compile_backend: str
    lowp_dtypes: tuple[torch.dtype, ...] | None
    lowp_ulps: float
    seed: int
    _cache: dict = field(default_factory=dict)

    def __post_init__(self):
        self.x64 = self.problem.inputs.map(lambda t: t.to(torch.float64))
        self.f = self.x64.bind(self.problem.fn_at(torch.float64))      # f(*diff) → fn's output
        self.ref = self.x64.bind(self.problem.ref_at(torch.float64)) if self.problem.ref_at else None
        self.diff = [t.detach() for t in self.x64.diff]
        self.labels = self.problem.labels

    def worst(self, kind: str) -> _Worst:
        if kind == "fd":
            return _Worst(FD_ATOL if self.atol is None else self.atol, FD_RTOL if self.rtol is None else self.rtol)
        return _Worst(EXACT_ATOL if self.atol is None else self.atol, EXACT_RTOL if self.rtol is None else self.rtol)

    def leaves(self) -> list[torch.Tensor]:
        return [t.clone().requires_grad_(True) for t in self.diff]

    def flat(self, f: Callable) -> Callable[..., list[torch.Tensor]]:
        return lambda *xs: _outputs(f(*xs))

    @property
    def out_shapes(self) -> list[torch.Size]:
        if "out_shapes" not in self._cache:
            with torch.no_grad():
                self._cache["out_shapes"] = [o.shape for o in self.flat(self.f)(*self.diff)]
        return self._cache["out_shapes"]

    def out_label(self, o: int) -> str:
        return "output" if len(self.out_shapes) == 1 else f"output {o}"

    def grad_outputs(self, batch: int | None = None) -> list[torch.Tensor]:
        """Random output gradients G, seeded so every check (and every run) sees the same ones."""
        gen = torch.Generator().manual_seed(self.seed + (batch or 0))
        lead = (batch,) if batch else ()
        dev = self.diff[0].device if self.diff else "cpu"
        return [torch.randn((*lead, *s), generator=gen, dtype=torch.float64).to(dev) for s in self.out_shapes]

    def jac_numerical(self) -> list[list[torch.Tensor]]:
        if "jnum" not in self._cache:
            self._cache["jnum"] = _jac_numerical(self.flat(self.f), self.diff)
        return self._cache["jnum"]


def _jac_numerical(f: Callable[..., list[torch.Tensor]], xs: Sequence[torch.Tensor],
                   eps: float = FD_EPS) -> list[list[torch.Tensor]]:
    """J[o][i] (out_o.numel(), x_i.numel()) by central differences: (f(x + eps e_j) − f(x − eps e_j)) / 2eps."""
    xs = [x.detach() for x in xs]
    with torch.enable_grad():
        base = [o.detach() for o in f(*[x.clone().requires_grad_(True) for x in xs])]
    J = [[torch.zeros(o.numel(), x.numel(), dtype=torch.float64, device=o.device) for x in xs] for o in base]
    for i, x in enumerate(xs):
        for j in range(x.numel()):
            cols = []
            for sign in (1.0, -1.0):
                xp = x.clone().contiguous()
                xp.view(-1)[j] += sign * eps
                args = [xp.requires_grad_(True) if k == i else xs[k].clone().requires_grad_(True) for k in range(len(xs))]
                with torch.enable_grad():
                    cols.append([o.detach().double().reshape(-1) for o in f(*args)])
            for o in range(len(base)):
                J[o][i][:, j] = (cols[0][o] - cols[1][o]) / (2 * eps)
    return J


def _jac_reverse(f: Callable[..., list[torch.Tensor]],
                 xs: Sequence[torch.Tensor]) -> tuple[list[list[torch.Tensor]], list[int]]:
    """J[o][i] by reverse mode, one backward per output element; also the outputs with no graph."""
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    outs = f(*leaves)
    notes = []
    J = [[torch.zeros(o.numel(), x.numel(), dtype=torch.float64, device=o.device) for x in xs] for o in outs]
    for o, out in enumerate(outs):
        if not out.requires_grad:
            notes.append(o)
            continue
        flat = out.reshape(-1)
        for k in range(flat.numel()):
            grads = torch.autograd.grad(flat[k], leaves, retain_graph=True, allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:
                    J[o][i][k] = g.detach().double().reshape(-1)
    return J, notes


def _compare_jacobians(w: _Worst, got, expected, out_labels, out_shapes, in_labels, in_shapes,
                       subject: Callable[[int, int], str]) -> None:
    """Every block J[o][i]; ``subject(o, i)`` names it in a failure message."""
    for o in range(len(expected)):
        for i in range(len(in_labels)):
            w.add(got[o][i], expected[o][i], subject(o, i),
                  _at_jac(out_shapes[o], out_labels[o], in_shapes[i], _short(in_labels[i])))


def _short(label: str) -> str:
    """``weight (argument 1)`` → ``weight``, ``parameter weight`` → ``weight``, for ∂out/∂weight[...]."""
    return label.split(" (")[0].removeprefix("parameter ")


def _grads(f: Callable, xs: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], create_graph: bool = False):
    """fn's outputs and ∂L/∂x for L = Σ_o ⟨out_o, v_o⟩ (None where an input is unused)."""
    outs = _outputs(f(*xs))
    pairs = [(o, v) for o, v in zip(outs, vs) if o.requires_grad]
    if not pairs or not any(x.requires_grad for x in xs):
        return outs, [None] * len(xs)
    wrt = [x for x in xs if x.requires_grad]
    got = iter(torch.autograd.grad([p[0] for p in pairs], wrt, [p[1].to(p[0].dtype) for p in pairs],
                                   create_graph=create_graph, allow_unused=True))
    return outs, [next(got) if x.requires_grad else None for x in xs]


def _grad_label(label: str) -> str:
    return f"the gradient of {label}"


# ---------------------------------------------------------------------------------------------
# The checks. Each returns a CheckResult (timing added by the caller) or raises _Unsupported.


def _check_gradcheck(c: _Ctx) -> CheckResult:
    f = c.flat(c.f)
    J_rev, no_graph = _jac_reverse(f, c.diff)
    J_num = c.jac_numerical()
    w = c.worst("fd")
    out_labels = [c.out_label(o) for o in range(len(J_num))]
    _compare_jacobians(w, J_rev, J_num, out_labels, c.out_shapes, c.labels, [x.shape for x in c.diff],
                       lambda o, i: f"the gradient of {c.labels[i]}" + (f" (from {out_labels[o]})" if len(out_labels) > 1 else ""))
    notes = [f"{out_labels[o]} does not require grad: fn's output is not connected to its inputs" for o in no_graph]
    result = w.result("gradcheck", "backward vs finite differences", notes)
    if result.status == "pass":  # torch's own gradcheck, for what a Jacobian comparison cannot see
        try:
            torch.autograd.gradcheck(f, tuple(c.leaves()), fast_mode=True, check_undefined_grad=True,
                                     atol=w.atol, rtol=w.rtol, raise_exception=True)
        except Exception as e:  # noqa: BLE001 - GradcheckError or an error raised by backward
            result.status, result.message = "fail", f"torch.autograd.gradcheck: {_first_lines(e)}"
    return result


def _check_gradgradcheck(c: _Ctx) -> CheckResult:
    """The Jacobian of g(x, G) = ∂L/∂x (L = Σ⟨out, G⟩) by reverse mode vs finite differences."""
    n = len(c.diff)
    v = c.grad_outputs()
    detached: list[int] = []

    def g(*xs_vs):
        xs, vs = xs_vs[:n], xs_vs[n:]
        _, grads = _grads(c.f, xs, vs, create_graph=True)
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
    J_rev, _ = _jac_reverse(g, xs)
    J_num = _jac_numerical(g, xs)
    w = c.worst("fd")
    out_labels = [f"grad_{_short(label)}" for label in c.labels]
    _compare_jacobians(w, J_rev, J_num, out_labels, [x.shape for x in c.diff], in_labels, [x.shape for x in xs],
                       lambda o, i: f"the derivative of the gradient of {c.labels[o]} with respect to {in_labels[i]}")
    notes = [f"the gradient of {c.labels[i]}, computed with create_graph=True, has no graph to differentiate: "
             "backward is not differentiable (@once_differentiable, or .detach(), .item(), .numpy() or "
             "torch.no_grad inside backward)"
             for i in sorted(detached) if (J_num[i] and any(b.abs().max() > w.atol for b in J_num[i] if b.numel()))]
    return w.result("gradgradcheck", "double backward vs finite differences", notes)


def _check_forward_ad(c: _Ctx) -> CheckResult:
    J_num = c.jac_numerical()
    J_fwd = [[torch.zeros_like(b) for b in row] for row in J_num]
    for i, x in enumerate(c.diff):
        for j in range(x.numel()):
            tangent = torch.zeros_like(x)
            tangent.view(-1)[j] = 1.0
            try:
                with fwAD.dual_level():
                    args = [fwAD.make_dual(x, tangent) if k == i else c.diff[k] for k in range(len(c.diff))]
                    outs = _outputs(c.f(*args))
                    tangents = [fwAD.unpack_dual(o).tangent for o in outs]
            except NotImplementedError as e:
                raise _Unsupported(f"forward-mode AD is not implemented: {_first_lines(e)}") from e
            for o, t in enumerate(tangents):
                if t is not None:
                    J_fwd[o][i][:, j] = t.detach().double().reshape(-1)
    w = c.worst("fd")
    _compare_jacobians(w, J_fwd, J_num, [c.out_label(o) for o in range(len(J_num))], c.out_shapes, c.labels,
                       [x.shape for x in c.diff], lambda o, i: f"the forward-mode derivative with respect to {c.labels[i]}")
    return w.result("forward_ad", "forward-mode AD (jvp) vs finite differences")


_VMAP_UNSUPPORTED = ("does not have vmap support", "must override the setup_context", "vmap staticmethod")


def _check_vmap(c: _Ctx) -> CheckResult:
    B = 3
    w = c.worst("exact")
    n = len(c.diff)
    try:
        # (a) vmap of the forward over a batch of inputs, vs a loop.
        scales = (1.0, 0.5, 1.5)  # positive scalings keep every input in its domain
        stacked = [torch.stack([x * s for s in scales]) for x in c.diff]
        batched = _outputs(torch.func.vmap(c.f, in_dims=(0,) * n)(*stacked))
        for b in range(B):
            with torch.no_grad():
                looped = _outputs(c.f(*[s[b] for s in stacked]))
            for o, (bo, lo) in enumerate(zip(batched, looped)):
                w.add(bo[b], lo, f"vmap(fn)'s {c.out_label(o)}", _at(lo.shape, f"batch {b}: {c.out_label(o)}"))
        # (b) batched gradients: B output gradients in one backward (is_grads_batched).
        vb = c.grad_outputs(batch=B)
        xs = c.leaves()
        outs = _outputs(c.f(*xs))
        pairs = [(o, v) for o, v in zip(outs, vb) if o.requires_grad]
        got = torch.autograd.grad([p[0] for p in pairs], xs, [p[1] for p in pairs], retain_graph=True,
                                  allow_unused=True, is_grads_batched=True)
        for b in range(B):
            one = torch.autograd.grad([p[0] for p in pairs], xs, [p[1][b] for p in pairs], retain_graph=True,
                                      allow_unused=True)
            for i, (gb, g1) in enumerate(zip(got, one)):
                if (gb is None) != (g1 is None):
                    w.add(torch.ones(1), torch.zeros(1), f"the batched gradient of {c.labels[i]}", _at((), "None vs a tensor"))
                elif gb is not None:
                    w.add(gb[b], g1, f"the batched gradient of {c.labels[i]}",
                          _at(g1.shape, f"batch {b}: {_short(c.labels[i])}"))
        # (c) per-sample gradients: vmap over torch.func.vjp, vs a loop.
        v = c.grad_outputs()

        def vjp(*xs):
            outs, pull = torch.func.vjp(lambda *a: tuple(c.flat(c.f)(*a)), *xs)
            return pull(tuple(v))

        per_sample = torch.func.vmap(vjp, in_dims=(0,) * n)(*stacked)
        for b in range(B):
            _, ref = _grads(c.f, [s[b].clone().requires_grad_(True) for s in stacked], v)
            for i, (ps, r) in enumerate(zip(per_sample, ref)):
                w.add(ps[b], torch.zeros_like(ps[b]) if r is None else r, f"the per-sample gradient of {c.labels[i]}",
                      _at(ps[b].shape, f"batch {b}: {_short(c.labels[i])}"))
    except RuntimeError as e:
        if any(s in str(e) for s in _VMAP_UNSUPPORTED):
            raise _Unsupported(_first_lines(e)) from e
        raise
    return w.result("vmap", "vmap vs a loop")


def _check_compile(c: _Ctx) -> CheckResult:
    import torch._dynamo

    v = c.grad_outputs()
    eager_out, eager_grads = _grads(c.f, c.leaves(), v)
    notes = []
    torch._dynamo.reset()
    with warnings.catch_warnings():
        # torch's own internals warn while tracing (torch.jit.script deprecation): not about fn
        warnings.simplefilter("ignore", DeprecationWarning)
        outs, grads = _compile_and_run(c, v, notes)
    w = c.worst("exact")
    _compare_outputs_and_grads(c, w, outs, grads, eager_out, eager_grads)
    return w.result("compile", f"torch.compile(backend={c.compile_backend!r}) vs eager", notes)


def _compile_and_run(c: _Ctx, v: list[torch.Tensor], notes: list[str]):
    import torch._dynamo

    try:
        try:
            compiled = torch.compile(c.f, backend=c.compile_backend, fullgraph=True)
            outs, grads = _grads(compiled, c.leaves(), v)
        except torch._dynamo.exc.Unsupported as e:
            if c.strict:
                raise _Unsupported(f"Dynamo cannot trace fn in one graph (fullgraph=True): {_first_lines(e)}") from e
            notes.append(f"Dynamo cannot trace fn in one graph, compared with fullgraph=False: {_first_lines(e, 1)}")
            torch._dynamo.reset()
            compiled = torch.compile(c.f, backend=c.compile_backend)
            outs, grads = _grads(compiled, c.leaves(), v)
    finally:
        torch._dynamo.reset()  # the next check compiles a new closure of the same code: no stale guards
    return outs, grads


def _compare_outputs_and_grads(c: _Ctx, w: _Worst, outs, grads, ref_outs, ref_grads) -> None:
    if len(outs) != len(ref_outs):
        raise AssertionError(f"fn returns {len(outs)} floating-point outputs, the reference {len(ref_outs)}")
    for o, (a, b) in enumerate(zip(outs, ref_outs)):
        if a.shape != b.shape:
            raise AssertionError(f"{c.out_label(o)} has shape {list(a.shape)}, expected {list(b.shape)}")
        w.add(a, b, f"the {c.out_label(o)}", _at(b.shape, c.out_label(o)))
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        x = c.diff[i]
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        w.add(a, b, _grad_label(c.labels[i]), _at(x.shape, _short(c.labels[i])))


def _check_reference(c: _Ctx) -> CheckResult:
    if c.ref is None:
        return CheckResult("reference", "skip", "no reference given")
    v = c.grad_outputs()
    outs, grads = _grads(c.f, c.leaves(), v)
    ref_outs, ref_grads = _grads(c.ref, c.leaves(), v)
    w = c.worst("exact")
    _compare_outputs_and_grads(c, w, outs, grads, ref_outs, ref_grads)
    return w.result("reference", "against the reference in float64")


def _check_lowp(c: _Ctx) -> CheckResult:
    p = c.problem
    if p.ref_at is None:
        return CheckResult("lowp", "skip", "no reference given: nothing to compare the low-precision error with")
    own = sorted({str(t.dtype) for t in p.inputs.diff})
    dtypes: list[torch.dtype | None] = list(c.lowp_dtypes) if c.lowp_dtypes else [None]
    if not c.lowp_dtypes and own == ["torch.float64"]:
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
        truth_out, truth_grads = _grads(truth_in.bind(p.ref_at(torch.float64)), truth_in.diff, v64)
        try:
            their_out, their_grads = _grads(low.bind(p.ref_at(dtype)), low.diff, v64)
        except RuntimeError as e:  # torch has no kernel for this dtype on this device
            notes.append(f"{name}: the reference refuses it ({_first_lines(e, 1)}), not compared")
            continue
        our_out, our_grads = _grads(low.bind(p.fn_at(dtype)), low.diff, v64)
        compared.append(name)
        items = [(f"the {c.out_label(o)}", a, b, t) for o, (a, b, t) in enumerate(zip(our_out, their_out, truth_out))]
        items += [(_grad_label(c.labels[i]), a, b, t) for i, (a, b, t) in enumerate(zip(our_grads, their_grads, truth_grads))]
        for subject, ours, theirs, truth in items:
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
            allowed = allowed_lowp_error(ref_err, t, eps, c.lowp_ulps)       # STYLE.md §7
            excess = torch.where(finite, err - allowed, -math.inf).reshape(-1)
            if excess.numel() == 0:
                continue
            max_abs = max(max_abs, err[finite].max().item() if finite.any() else 0.0)
            max_rel = max(max_rel, (err / t.abs().clamp_min(eps))[finite].max().item() if finite.any() else 0.0)
            k = int(excess.argmax())
            if excess[k].item() > worst_excess:
                worst_excess = excess[k].item()
                idx = _unravel(k, t.shape)
                worst = dict(dtype=name, subject=subject, idx=idx, err=err.reshape(-1)[k].item(),
                             got=ours.detach().double().reshape(-1)[k].item(), truth=t.reshape(-1)[k].item(),
                             ref_err=ref_err[finite].max().item(), allowed=allowed.reshape(-1)[k].item(),
                             where=f"{_short(subject.replace('the gradient of ', '').replace('the ', ''))}"
                                   f"[{', '.join(map(str, idx))}] ({name})")
    if not compared:
        return CheckResult("lowp", "skip", "; ".join(notes))
    tol = LOWP_RULE.replace("ulps", f"{c.lowp_ulps:g}")
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


def _check_needs_grad(c: _Ctx) -> CheckResult:
    v = c.grad_outputs()
    _, grads = _grads(c.f, c.leaves(), v)
    if c.ref is not None:
        _, expected = _grads(c.ref, c.leaves(), v)
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
            problems.append(f"the gradient of {c.labels[i]} is {what}, but {source} max |∂L/∂{_short(c.labels[i])}| = {big:.3g}")
    # Each input alone requiring grad: the same gradient as when all do (needs_input_grad branches).
    for i in range(len(c.diff)):
        xs = [x.clone().requires_grad_(k == i) for k, x in enumerate(c.diff)]
        try:
            _, alone = _grads(c.f, xs, v)
        except Exception as e:  # noqa: BLE001 - backward crashed on a needs_input_grad branch
            problems.append(f"with only {c.labels[i]} requiring grad, fn or its backward raised {type(e).__name__}: "
                            f"{_first_lines(e)}")
            continue
        a = torch.zeros_like(c.diff[i]) if alone[i] is None else alone[i]
        b = torch.zeros_like(c.diff[i]) if grads[i] is None else grads[i]
        w.add(a, b, f"the gradient of {c.labels[i]} when it alone requires grad",
              _at(c.diff[i].shape, f"{_short(c.labels[i])} (alone)"))
    result = w.result("needs_grad", "vs every input requiring grad")
    if problems:
        result.status = "fail"
        result.message = "\n".join([*problems, result.message] if result.message else problems)
    return result


def _sliced(t: torch.Tensor) -> torch.Tensor:
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


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values stored column-major (the layout of ``weight.mT``)."""
    return t.mT.contiguous().mT if t.dim() >= 2 else t


def _check_noncontiguous(c: _Ctx) -> CheckResult:
    v = c.grad_outputs()
    outs, grads = _grads(c.f, c.leaves(), v)
    w = c.worst("exact")
    for layout, make in (("sliced", _sliced), ("column-major", _transposed)):
        moved = c.x64.map(make)  # every floating tensor, differentiable or not
        try:
            s_outs, s_grads = _grads(moved.bind(c.problem.fn_at(torch.float64)), moved.diff, [make(t) for t in v])
        except Exception as e:  # noqa: BLE001 - fn refuses a layout torch accepts: that is the verdict
            raise AssertionError(f"with {layout} inputs and output gradient, {type(e).__name__}: {_first_lines(e)}") from e
        _compare_outputs_and_grads(c, w, s_outs, s_grads, outs, grads)
    return w.result("noncontiguous", "non-contiguous (sliced, column-major) vs contiguous inputs and output gradient")


_CHECKS: dict[str, Callable[[_Ctx], CheckResult]] = {
    "gradcheck": _check_gradcheck, "gradgradcheck": _check_gradgradcheck, "forward_ad": _check_forward_ad,
    "vmap": _check_vmap, "compile": _check_compile, "reference": _check_reference, "lowp": _check_lowp,
    "needs_grad": _check_needs_grad, "noncontiguous": _check_noncontiguous,
}
assert tuple(_CHECKS) == ALL


def _first_lines(e: BaseException, n: int = 3) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:n])[:600]


def _name_indices(message: str, names: list[str] | None) -> str:
    """torch says "invalid gradient at index 1"; add the argument's name."""
    import re

    if not names:
        return message

    def sub(m):
        k = int(m.group(2)) - (m.group(1) == "at position")  # torch counts positions from 1, indices from 0
        return f"{m.group(0)} ({names[k]})" if 0 <= k < len(names) else m.group(0)

    message = re.sub(r"(at index|at position) (\d+)", sub, message, count=1)
    return message


def _run(problem: _Problem, checks: Iterable[str], atol, rtol, strict, compile_backend, lowp_dtypes, lowp_ulps,
         seed, names) -> Report:
    checks = list(checks)
    unknown = [n for n in checks if n not in _CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; known: {list(ALL)}")
    device = str(problem.inputs.diff[0].device) if problem.inputs.diff else "cpu"
    report = Report(problem.name, problem.arg_lines, device)
    if not problem.inputs.diff:
        report.checks.append(CheckResult("inputs", "fail", "no floating-point tensor input to differentiate"))
        return report
    ctx = _Ctx(problem, atol, rtol, strict, compile_backend, tuple(lowp_dtypes) if lowp_dtypes else None, lowp_ulps, seed)
    try:
        has_output = bool(ctx.out_shapes)
        why = "fn returns no floating-point tensor"
    except Exception as e:  # noqa: BLE001 - fn cannot even run forward on float64 copies
        has_output, why = False, f"fn raised {type(e).__name__} on float64 copies of the inputs: {_first_lines(e)}"
    if not has_output:
        report.checks.append(CheckResult("inputs", "fail", why))
        return report
    for name in checks:
        start = time.perf_counter()
        try:
            result = _CHECKS[name](ctx)
        except _Unsupported as e:
            result = CheckResult(name, "fail" if strict else "skip", f"unsupported{' (strict)' if strict else ''}: {e}")
        except Exception as e:  # noqa: BLE001 - the check ran fn, and fn raised: that is the verdict
            result = CheckResult(name, "fail", f"raised {type(e).__name__}: {_name_indices(_first_lines(e), names)}")
        result.seconds = time.perf_counter() - start
        report.checks.append(result)
    return report


def _normalise(args: tuple, kwargs: dict | None) -> Inputs:
    """An ``Inputs`` passed alone is used as is; if no tensor requires grad, every floating one does."""
    if len(args) == 1 and isinstance(args[0], Inputs) and not kwargs:
        inputs = args[0]
    else:
        inputs = Inputs(tuple(args), dict(kwargs or {}))
    if not inputs.diff:
        def diff(t):
            is_float = isinstance(t, torch.Tensor) and t.is_floating_point()
            return t.detach().requires_grad_(True) if is_float else t

        inputs = Inputs(tuple(diff(a) for a in inputs.args), {k: diff(v) for k, v in inputs.kwargs.items()})
    return inputs


def _labels(inputs: Inputs, names: list[str] | None) -> tuple[list[str], list[str]]:
    labels, lines = [], []
    n = len(inputs.args)
    for k, t in enumerate((*inputs.args, *inputs.kwargs.values())):
        if k < n:
            label = f"{names[k]} (argument {k})" if names and k < len(names) else f"argument {k}"
        else:
            label = list(inputs.kwargs)[k - n]
        lines.append(f"{_short(label)} {_describe(t)}")
        if isinstance(t, torch.Tensor) and t.requires_grad:
            labels.append(label)
    return labels, lines


def _qualname(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def check_function(
    fn: Callable | type[torch.autograd.Function],
    *inputs: Any,
    reference: Callable | None = None,
    checks: Iterable[str] = ALL,
    atol: float | None = None,
    rtol: float | None = None,
    kwargs: dict[str, Any] | None = None,
    strict: bool = False,
    compile_backend: str = "aot_eager",
    lowp_dtypes: Sequence[torch.dtype] | None = None,
    lowp_ulps: float = 2.0,
    seed: int = 0,
    name: str | None = None,
) -> Report:
    r"""Check ``fn``'s gradients every way there is; return a ``Report`` (never raises for a bad fn).

    Args:
        fn: an ``autograd.Function`` class (its ``apply``, or handgrad's ``call``), a functional
            op, or any callable built from differentiable pieces.
        *inputs: the arguments to call ``fn`` with (or one ``handgrad.testing.Inputs``). The
            floating-point tensors that require grad are the ones differentiated; if none
            requires grad, every floating-point tensor is. The caller's tensors are not modified:
            every check runs on float64 copies, except ``lowp``.
        reference: a callable computing the same function with autograd (e.g. the
            ``torch.nn.functional`` op), same arguments. Enables the ``reference`` and ``lowp``
            checks and is the truth for ``needs_grad``.
        checks: the names of the checks to run (default ``ALL``; see this module's docstring).
        atol, rtol: replace every float64 tolerance (by default 1e-5/1e-3 against finite
            differences, 1e-7/1e-7 between two exact computations; see the module docstring).
        kwargs: keyword arguments for ``fn`` (tensors among them are differentiated too).
        strict: report an unsupported feature (no ``jvp``, no vmap rule, a Dynamo graph break)
            as a failure rather than a skip.
        compile_backend: the ``torch.compile`` backend for the ``compile`` check. The default,
            ``"aot_eager"``, traces the forward and backward graphs through AOTAutograd as
            inductor does but runs them eagerly, so a check takes about 0.5 s rather than several
            seconds of code generation; pass ``"inductor"`` to test the generated kernels too.
        lowp_dtypes: dtypes for the ``lowp`` check; by default the inputs' own dtype (skipped if
            that is float64).
        lowp_ulps: the ``lowp`` margin in units of the dtype's eps (STYLE.md §7).
        seed: seeds the random output gradients, so reports are reproducible.
        name: the report's title (default: fn's qualified name).

    Returns:
        a ``Report``: ``report.ok``, ``str(report)``, ``report.to_dict()``, ``report["gradcheck"]``.

    Example::

        report = check_function(MyLinear, x, w, b, reference=torch.nn.functional.linear)
        assert report.ok, report
    """
    given = _normalise(inputs, kwargs)
    names = _param_names(fn)
    labels, lines = _labels(given, names)
    call = _as_callable(fn)
    problem = _Problem(name or _qualname(fn), lambda dtype: call, (lambda dtype: reference) if reference else None,
                       given, labels, lines)
    # torch's "invalid gradient at index k" counts the Function's forward arguments: name them only then
    is_function = isinstance(fn, type) and issubclass(fn, torch.autograd.Function)
    return _run(problem, checks, atol, rtol, strict, compile_backend, lowp_dtypes, lowp_ulps, seed,
                names if is_function else None)


def check_module(
    module: torch.nn.Module,
    *inputs: Any,
    reference: torch.nn.Module | None = None,
    checks: Iterable[str] = ALL,
    atol: float | None = None,
    rtol: float | None = None,
    strict: bool = False,
    compile_backend: str = "aot_eager",
    lowp_dtypes: Sequence[torch.dtype] | None = None,
    lowp_ulps: float = 2.0,
    seed: int = 0,
    name: str | None = None,
) -> Report:
    r"""``check_function`` for an ``nn.Module``: its outputs with respect to its inputs and every parameter.

    The checks run on a float64 deep copy (``lowp`` on a copy in the module's own dtype, or in
    ``lowp_dtypes``); ``module`` itself is not modified. Floating-point inputs are differentiated
    (those that require grad, or all of them if none does), and so is every parameter that
    requires grad, labelled by its name (``parameter weight``).

    Args:
        module: the module to check. Put it in ``eval()`` mode if it is random in training
            (dropout): finite differences need a deterministic function.
        *inputs: the arguments of ``module(...)``.
        reference: an ``nn.Module`` computing the same function with autograd (e.g. the
            ``torch.nn`` layer), with the same parameter names; it is run with ``module``'s
            parameter values (``torch.func.functional_call``), its own values are ignored.
        others: as for ``check_function``.
    """
    params = {k: p for k, p in module.named_parameters() if p.requires_grad}
    given_in = _normalise(inputs, None)
    n_in = len(given_in.args)
    pnames = list(params)

    def at(mod: torch.nn.Module) -> Callable[[torch.dtype | None], Callable]:
        cache: dict = {}

        def make(dtype):
            if dtype not in cache:
                m = copy.deepcopy(mod)
                cache[dtype] = m if dtype is None else m.to(dtype)

            def call(*args):
                return torch.func.functional_call(cache[dtype], dict(zip(pnames, args[n_in:])), tuple(args[:n_in]))

            return call

        return make

    given = Inputs((*given_in.args, *[p.detach().clone().requires_grad_(True) for p in params.values()]))
    in_labels, in_lines = _labels(Inputs(given_in.args), None)
    in_labels = [label.replace("argument", "input") for label in in_labels]
    labels = [*in_labels, *[f"parameter {k}" for k in pnames]]
    lines = [*[line.replace("argument", "input") for line in in_lines],
             *[f"{k} {_describe(p)}" for k, p in params.items()]]
    problem = _Problem(name or type(module).__name__, at(module), at(reference) if reference is not None else None,
                       given, labels, lines)
    return _run(problem, checks, atol, rtol, strict, compile_backend, lowp_dtypes, lowp_ulps, seed, None)


def assert_gradients_match(
    fn: Callable | type[torch.autograd.Function] | torch.nn.Module,
    reference: Callable | torch.nn.Module | None,
    *inputs: Any,
    checks: Iterable[str] = ALL,
    **options: Any,
) -> Report:
    """Run ``check_function`` (or ``check_module`` for a module); raise ``AssertionError`` on any failure.

    For users' own pytest suites::

        def test_my_linear():
            x, w = torch.randn(5, 3), torch.randn(4, 3)
            assert_gradients_match(MyLinear, torch.nn.functional.linear, x, w)

    The error's message is the full report: which check failed, which input's gradient is
    wrong, where, and by how much. Returns the report when everything passes (skips allowed).
    """
    if isinstance(fn, torch.nn.Module):
        report = check_module(fn, *inputs, reference=reference, checks=checks, **options)
    else:
        report = check_function(fn, *inputs, reference=reference, checks=checks, **options)
    if not report.ok:
        raise GradientCheckError(report)
    return report


def representative_shape(case: OpCase) -> Shape:
    """The one shape ``handgrad-check`` uses for a case: the smallest non-empty one with at least
    two dims (a batch and a feature dim), else the smallest non-empty one. Small keeps the full
    Jacobian comparisons (one backward per output element, two forwards per input element) fast;
    the registry's other shapes (odd, batched, empty) run in ``tests/test_ops.py``."""
    nonempty = [s for s in case.shapes if all(d > 0 for d in s)] or list(case.shapes)
    size = lambda s: (len(s) < 2, torch.Size(s).numel())  # noqa: E731
    return min(nonempty, key=size)


def check_case(case: OpCase, shape: Shape | None = None, device: str | torch.device = "cpu",
               checks: Iterable[str] = ALL, strict: bool = True) -> Report:
    """Check one registry case (``handgrad.testing.registry``) at ``shape`` (default: its
    representative shape), strictly: a handgrad op must support every feature. Inputs are made in
    the first of the case's low-precision dtypes, so the ``lowp`` check runs in each of
    ``case.lowp_dtypes`` with the case's margin; every other check runs on float64 copies."""
    shape = representative_shape(case) if shape is None else tuple(shape)
    dtype = case.lowp_dtypes[0] if case.lowp_dtypes else torch.float64
    with torch.random.fork_rng(devices=[]):  # the same inputs every run; the caller's RNG untouched
        torch.manual_seed(0)
        inputs = case.inputs(shape, dtype, device)
    return check_function(case.fn, inputs, reference=case.reference, checks=checks, strict=strict,
                          lowp_dtypes=case.lowp_dtypes, lowp_ulps=case.lowp_ulps, name=case.id(shape))
