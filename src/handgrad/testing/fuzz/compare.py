"""Run one call on torch and on handgrad, and say every way the two differ.

Compared, in order: whether the forward raises and the exception's type; the output's type,
dtype, shape and values; whether it requires grad; the backward (a random G = ∂L/∂Y, the same on
both sides) raising and its type; and each input gradient's presence, dtype, shape and values.

Values. An element of handgrad's result agrees if it equals torch's (the same nan, the same inf)
or if its error against the truth is within the registry's rule (``registry.LOWP_RULE``:
``|ours − truth| ≤ 2·max|torch − truth| + ulps·eps·(|truth| + mean|truth| + terms)``, ``terms``
the size of the terms a gradient element sums, ``tolerances.TERM_SCALES``), where torch's
error ``|torch − truth|`` is taken as the largest of:
- torch's error against the float64 truth: torch's op in float64 on the very values the call saw
  (rounded to its dtype first); for a float64 call torch's result is the truth;
- the truth's change when every input and G are moved by one rounding of the call's precision
  (the "wobble"): an error no larger is what a backward-stable algorithm makes, so handgrad may
  make it too (a gradient that sums to 0 by cancellation, exactly or by luck in torch);
- for float64 calls, torch's float32 error on the same values scaled by 2⁻²⁹ (see
  ``value_mismatch``): float64 has no truth above it.
float64 results may also differ by ``FLOAT64_ULPS`` roundings of max|G| (gradients) or, for the
ops that reduce, of max|input| (values): a cancellation among intermediates that large leaves
that much in either result, and float64 has no truth to tell the two apart.
``ulps`` is the registry case's ``lowp_ulps`` below float64 and ``FLOAT64_ULPS`` in float64.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ... import catalogue
from ..tolerances import allowed_lowp_error, term_scales
from .call import Call, build, nested, wobble

__all__ = ["Outcome", "Mismatch", "run_side", "compare", "FLOAT64_ULPS"]

# float64: handgrad and torch evaluate the same formula in another form or order (two-pass
# variance against Welford, erfc against erf, a log-sum-exp against a fused kernel, the sums of a
# backward in another order). Each differs from the exact value by a few roundings of the
# largest intermediate, which the rule scales by |truth| + mean|truth|; 64 roundings of float64
# (1.4e-14 relative) is far below any wrong formula, which errs at 1e-3 or more.
FLOAT64_ULPS = 64.0


@dataclass
class Outcome:
    error: type | None = None           # the forward's exception type
    message: str = ""
    out: Any = None
    requires_grad: bool = False
    backward_error: type | None = None
    backward_message: str = ""
    grads: tuple | None = None          # one per leaf that requires grad (None where unused)
    g_scale: float = 0.0                # max |G| over its finite elements
    x_scale: float = 0.0                # max |input| over the finite elements (reductions only)
    extra: tuple | None = None          # a tuple result's other tensors (max_pool2d's indices)
    terms: tuple | None = None          # per gradient, the size of the terms it sums (or None)


@dataclass(frozen=True)
class Mismatch:
    kind: str          # "exception", "output", "dtype", "shape", "value", "requires_grad", "backward", "grad"
    detail: str        # what differs, torch's first then handgrad's
    key: str           # the class: kind plus what identifies it (e.g. the two exception types)


def _grad_output(out: torch.Tensor, seed: int, rounding: torch.dtype) -> torch.Tensor:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g.to(rounding).to(out.dtype)


def run_side(fn: Callable, call: Call, dtype: torch.dtype | None = None, rounding: dict | None = None,
             perturb: int | None = None, terms: Callable | None = None) -> Outcome:
    """Call ``fn`` on the call's arguments (in ``dtype`` for the truth), then backward with a
    seeded G rounded to ``rounding['g']`` (torch's output dtype). ``perturb``: a seed; every
    input and G are then moved by one rounding of the call's precision (see ``compare``).
    ``terms``: the op's absolute computation (``tolerances.TERM_SCALES``), evaluated on the same
    arguments and G into ``Outcome.terms``."""
    wob = None
    if perturb is not None:
        wob = (torch.Generator().manual_seed(perturb), torch.finfo(call.precision() or torch.float64).eps)
    args, kwargs, leaves = build(call, dtype, wob)
    o = Outcome()
    if call.op not in _ELEMENTWISE:
        # float64 outputs of reductions: their intermediates (a log-sum-exp less x_y, x − μ) are as
        # large as the inputs, so a cancellation leaves a few roundings of max|input| in torch's
        # result as in handgrad's (the same argument as for G in ``compare``)
        finite = [t[t.isfinite()] for t in (u.detach() for u in nested((args, kwargs), torch.Tensor)) if t.is_floating_point()]
        o.x_scale = max((float(t.abs().max()) for t in finite if t.numel()), default=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.manual_seed(call.seed)        # every side draws the same random numbers (dropout's mask)
            out = fn(*args, **kwargs)
        except Exception as e:          # noqa: BLE001 — the type is what is compared
            o.error, o.message = type(e), str(e).split("\n")[0][:200]
            return o
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and all(
                isinstance(t, torch.Tensor) or t is None for t in out[1:]):
            # (output, indices…) as max_pool2d's return_indices: the first is differentiated, the
            # others compared exactly
            o.extra = tuple(None if t is None else t.detach() for t in out[1:])
            out = out[0]
        o.out = out
        if not isinstance(out, torch.Tensor):
            return o
        o.requires_grad = out.requires_grad
        if out.requires_grad and leaves and out.is_floating_point():
            g = _grad_output(out, call.seed + 1, (rounding or {}).get("g", out.dtype))
            if wob is not None:
                g = wobble(g, *wob)
            finite = g[g.isfinite()]
            o.g_scale = float(finite.abs().max()) if finite.numel() else 0.0
            try:
                o.grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
            except Exception as e:      # noqa: BLE001
                o.backward_error, o.backward_message = type(e), str(e).split("\n")[0][:200]
            else:
                o.terms = tuple(term_scales(terms, g, args, kwargs, leaves)) if terms is not None else None
        o.out = out.detach()
    return o


_ELEMENTWISE = frozenset(catalogue.activations())




def _ulps(dtype: torch.dtype, lowp_ulps: float) -> float:
    return FLOAT64_ULPS if dtype == torch.float64 else lowp_ulps


def _same_shape(t, ref):
    return t if isinstance(t, torch.Tensor) and t.shape == ref.shape and not t.is_complex() else None


_F32_TO_F64 = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps   # 2⁻²⁹


def value_mismatch(ours: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor | None, wobble: torch.Tensor | None,
                   coarse: torch.Tensor | None, lowp_ulps: float, floor: float = 0.0,
                   precision: torch.dtype | None = None, terms: torch.Tensor | None = None) -> str | None:
    """None if ``ours`` agrees with ``ref`` under the rule above, else a line saying where not.
    ``truth``: torch in float64; ``wobble``: the same, its inputs moved by a float64 rounding;
    ``coarse`` (float64 calls): torch in float32 on the same values; ``floor``: an error always
    allowed (float64 gradients: ``FLOAT64_ULPS`` roundings of max|G|, see ``compare``);
    ``precision``: the call's (a float64 result computed through float32 is held to float32);
    ``terms``: the size of the terms each element sums (``tolerances.term_scales``)."""
    if ours.numel() == 0:
        return None
    if not (ref.is_floating_point() or ref.is_complex()):
        return None if torch.equal(ours, ref) else f"values differ (exact dtype {ref.dtype})"
    if ref.is_complex():
        def real(t):
            return torch.view_as_real(t.resolve_conj()) if isinstance(t, torch.Tensor) and t.is_complex() else None

        ours, ref, truth, wobble, coarse = real(ours), real(ref), real(truth), real(wobble), real(coarse)
    o, r = ours.double(), ref.double()
    truth, wobble, coarse = _same_shape(truth, ref), _same_shape(wobble, ref), _same_shape(coarse, ref)
    t = r if truth is None else truth.double()
    same = (o == r) | (o.isnan() & r.isnan())
    tf = t.isfinite()
    # torch's own error: against the truth, and the truth's sensitivity to one rounding of its inputs
    ref_err = (r - t).abs().where(r.isfinite() & tf, 0.0)
    if wobble is not None:
        w = wobble.double()
        ref_err = torch.maximum(ref_err, (w - t).abs().where(w.isfinite() & tf, 0.0))
    if coarse is not None and ref.dtype == torch.float64:
        # float64 has no truth above it, so torch's own float64 error is estimated from its float32
        # error on the same values, scaled by the ratio of the two epsilons (rounding errors are
        # linear in eps to first order): this is what finds the cancellation inside an algorithm
        # (a softmax gradient's G − (G ⊙ Y)1 where one Y is ≈ 1), which the wobble cannot.
        c = coarse.double()
        ref_err = torch.maximum(ref_err, ((c - t).abs() * _F32_TO_F64).where(c.isfinite() & tf, 0.0))
    dtype = max((ref.dtype, precision or ref.dtype), key=lambda d: torch.finfo(d).eps)
    terms = _same_shape(terms, ref)
    allowed = allowed_lowp_error(ref_err, t, torch.finfo(dtype).eps, _ulps(dtype, lowp_ulps), terms) + floor
    # where the float64 truth itself is nan (a below-float64 call), nan is the right answer too
    # and so is the truth's own inf
    ok = same | (tf & o.isfinite() & ((o - t).abs() <= allowed)) | (t.isnan() & o.isnan()) | (o == t)
    if bool(ok.all()):
        return None
    i = int((~ok).flatten().nonzero()[0])
    n = int((~ok).sum())
    return (f"{n}/{ok.numel()} elements: e.g. at flat index {i} torch {r.flatten()[i].item():.6g}, "
            f"handgrad {o.flatten()[i].item():.6g}, truth {t.flatten()[i].item():.6g}, "
            f"allowed ±{allowed.flatten()[i].item():.3g}")


def _name(e: type | None) -> str:
    return "ok" if e is None else e.__name__


def _ok(o: Outcome | None) -> Outcome | None:
    return o if o is not None and o.error is None and o.backward_error is None else None


def compare(theirs: Outcome, ours: Outcome, truth: Outcome | None, wobble: Outcome | None,
            coarse: Outcome | None, lowp_ulps: float, precision: torch.dtype | None = None) -> list[Mismatch]:
    """Every way ``ours`` (handgrad) differs from ``theirs`` (torch); ``truth``: torch in float64,
    ``wobble``: the same with its inputs moved by a rounding (see ``value_mismatch``)."""
    if theirs.error or ours.error:
        if theirs.error is ours.error:
            return []
        key = f"exception torch {_name(theirs.error)} / handgrad {_name(ours.error)}"
        return [Mismatch("exception", f"torch: {_name(theirs.error)}: {theirs.message} | handgrad: "
                                      f"{_name(ours.error)}: {ours.message}", key)]
    t, h = theirs.out, ours.out
    if not isinstance(t, torch.Tensor) or not isinstance(h, torch.Tensor):
        return [] if type(t) is type(h) and t == h else [Mismatch("output", f"{t!r} | {h!r}", "output type")]
    if t.dtype != h.dtype:
        return [Mismatch("dtype", f"torch {t.dtype} | handgrad {h.dtype}", f"dtype {t.dtype} / {h.dtype}")]
    if t.shape != h.shape:
        return [Mismatch("shape", f"torch {list(t.shape)} | handgrad {list(h.shape)}", "shape")]
    out: list[Mismatch] = []
    if (theirs.extra is None) != (ours.extra is None) or theirs.extra is not None and (
            len(theirs.extra) != len(ours.extra) or not all(
                a is b is None or a is not None and b is not None and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a, b) for a, b in zip(theirs.extra, ours.extra))):
        out.append(Mismatch("output", "the other outputs of a tuple result (indices) differ", "tuple outputs"))
    # the forward's truth stands where only torch's backward refuses (group_norm's bias without a weight)
    fwd = [o.out if o is not None and o.error is None else None for o in (truth, wobble, coarse)]
    truth, wobble, coarse = _ok(truth), _ok(wobble), _ok(coarse)
    bad = value_mismatch(h, t, *fwd, lowp_ulps,
                         FLOAT64_ULPS * torch.finfo(torch.float64).eps * theirs.x_scale
                         if t.dtype == torch.float64 and precision in (None, torch.float64) else 0.0, precision)
    if bad:
        out.append(Mismatch("value", bad, "value"))
    if theirs.requires_grad != ours.requires_grad:
        return out + [Mismatch("requires_grad", f"torch {theirs.requires_grad} | handgrad {ours.requires_grad}",
                               "requires_grad")]
    if theirs.backward_error or ours.backward_error:
        if theirs.backward_error is not ours.backward_error:
            out.append(Mismatch("backward", f"torch: {_name(theirs.backward_error)}: {theirs.backward_message} | "
                                            f"handgrad: {_name(ours.backward_error)}: {ours.backward_message}",
                                f"backward torch {_name(theirs.backward_error)} / handgrad "
                                f"{_name(ours.backward_error)}"))
        return out
    if theirs.grads is None or ours.grads is None:
        return out
    none = [None] * len(theirs.grads)
    truth_grads = truth.grads if truth is not None and truth.grads is not None else none
    wobble_grads = wobble.grads if wobble is not None and wobble.grads is not None else none
    coarse_grads = coarse.grads if coarse is not None and coarse.grads is not None else none
    terms = truth.terms if truth is not None and truth.terms is not None else none
    for i, (tg, hg, xg, wg, cg, sg) in enumerate(zip(theirs.grads, ours.grads, truth_grads, wobble_grads, coarse_grads,
                                                      terms)):
        if (tg is None) != (hg is None):
            out.append(Mismatch("grad", f"input {i}: torch {'no ' if tg is None else ''}gradient | handgrad "
                                        f"{'no ' if hg is None else ''}gradient", "grad presence"))
        elif tg is not None:
            if tg.layout != hg.layout:
                out.append(Mismatch("grad", f"input {i}: torch {tg.layout} | handgrad {hg.layout}", "grad layout"))
                continue
            if tg.is_sparse:   # (embedding's sparse=True) compared as the dense tensors they sum to
                tg, hg, xg, wg, cg = (t if t is None or not t.is_sparse else t.to_dense() for t in (tg, hg, xg, wg, cg))
            if tg.dtype != hg.dtype or tg.shape != hg.shape:
                out.append(Mismatch("grad", f"input {i}: torch {tg.dtype}{list(tg.shape)} | handgrad "
                                            f"{hg.dtype}{list(hg.shape)}", "grad dtype/shape"))
                continue
            # float64 gradients: every backward starts from G, and its intermediates (a softmax's
            # G − (G ⊙ Y)1, layer_norm's gy − mean(gy)) are as large as G, so a cancellation there
            # leaves a few roundings of max|G| in torch's float64 result as in handgrad's; float64
            # has no truth to tell the two apart (precision below that is checked in float32 and
            # the half types, against a float64 truth).
            f64 = tg.dtype == torch.float64 and precision in (None, torch.float64)
            floor = FLOAT64_ULPS * torch.finfo(torch.float64).eps * theirs.g_scale if f64 else 0.0
            bad = value_mismatch(hg, tg, xg, wg, cg, lowp_ulps, floor, precision, sg)
            if bad:
                out.append(Mismatch("grad", f"input {i}: {bad}", "grad value"))
    return out
