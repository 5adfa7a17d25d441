"""The deliberate differences of the attention ops (scaled_dot_product_attention,
multi_head_attention_forward) from torch: the fields of ``differences.Difference`` (name, op,
kinds, when, torch, handgrad, why, reproducer), made entries of ``differences.DIFFERENCES``."""
from __future__ import annotations

__all__ = ["ATTENTION"]


def _attention_nonfinite(call) -> bool:
    # a nan, an inf or a huge value (|x| ≥ 1e4: scores of two such reach 1e8), after the call's rounding
    return any(not (v := s.base.to(s.dtype).double()).isfinite().all() or bool((v.abs() >= 1e4).any())
               for s in call.specs() if s.dtype.is_floating_point)


def _equal_key_rows(call) -> bool:
    # the keys or the values (sdpa: args 1, 2, (…, S, E); multi-head: (S, N, E)) are one row
    # expanded along the key axis: every row the same
    from ..fuzz.call import Spec
    axis = 0 if call.op == "multi_head_attention_forward" else -2
    for s in call.args[1:3]:
        if isinstance(s, Spec) and s.view and s.view[0] == "expand" and len(s.base.shape) >= 2:
            if s.base.shape[axis] == 1 and s.shape[axis] > 1:
                return True
    return False


def _causal_nonpositive_scale(call) -> bool:
    sc = call.kwargs.get("scale")
    return bool(call.kwargs.get("is_causal")) and isinstance(sc, (int, float)) and sc <= 0


_OPS = ("scaled_dot_product_attention", "multi_head_attention_forward")


ATTENTION: tuple[tuple, ...] = (
    *((
        "attention: non-finite or huge inputs give one answer, not the kernel's", op, ("value", "grad"),
        _attention_nonfinite,
        "its two CPU kernels disagree on the same inputs: the flash kernel's row max skips nan scores in "
        "its scalar tail, so a row of nan scores gives 0, and it masks before adding, so an inf score at "
        "a masked key is ignored; the math kernel (3-D inputs, dropout, a mask requiring grad) gives nan for "
        "both (it adds −∞ masks: +∞ + (−∞) = nan); P V then multiplies 0-weights by inf values (nan). "
        "Inputs of |x| ≥ 1e4 give scores of 1e8 and more, whose own rounding (|S|·eps) moves the weights "
        "by more than the rule allows, differently as each kernel forms scale·Q Kᵀ ((Q Kᵀ)·scale, or "
        "(√scale·Q)(√scale·K)ᵀ)",
        "one formula for every layout: a masked score is ignored whatever its value, nan and inf "
        "propagate as IEEE arithmetic has them, a row whose every score is −∞ gives 0; scores are "
        "(scale·Q) Kᵀ",
        "Which answer torch gives depends on the inputs' strides and dims (its kernel choice), not on the "
        "values: F.scaled_dot_product_attention(q, k, v) with a nan in every key is 0 for a 4-D q and "
        "nan for the same q as 3-D.",
        "q = torch.randn(1, 1, 2, 1); k = torch.full((1, 1, 3, 1), float('nan')); v = torch.randn(1, 1, 3, 1); "
        "compare F.scaled_dot_product_attention(q, k, v) with (q[0], k[0], v[0])") for op in _OPS),
    *((
        "attention: equal key or value rows cancel to a rounding", op, ("value", "grad"), _equal_key_rows,
        "with every key (or value) row the same, exact arithmetic makes dP − rowsum(P ⊙ dP) or "
        "Σ_j dS_j vanish; torch's kernels return 0 or a residue of a few roundings of |P ⊙ dP| "
        "depending on their summation order (flash or math, block sizes)",
        "the same formula, also 0 or a residue of a few roundings of |P ⊙ dP| (1e-8 where the other "
        "elements are O(1) in float32)",
        "Not a difference in the formula: the float64 truth there is 0, so the rule allows no rounding "
        "at all, and which of two correct orders of summation cancels exactly is chance. The expanded "
        "rows are the only way the fuzzer draws exactly equal rows (a one-rounding wobble keeps them equal).",
        "python -m handgrad.testing.fuzz --call scaled_dot_product_attention:725395871990") for op in _OPS),
    (
        "attention: is_causal with scale ≤ 0 stays causal", "scaled_dot_product_attention", ("value", "grad"),
        _causal_nonpositive_scale,
        "its flash kernel (4-D inputs) fills the masked scores with −∞ and then multiplies by the scale: "
        "scale = 0 gives 0·(−∞) = nan for every output, scale < 0 gives the masked keys +∞ (nan); its "
        "math kernel (3-D inputs) gives the causal softmax of the scaled scores",
        "the causal softmax of the scaled scores for any scale, as torch's math kernel",
        "The mask says which keys a query may see; a scale cannot unmask them. torch's answer depends on "
        "the inputs' dims.",
        "F.scaled_dot_product_attention(torch.randn(1, 1, 2, 3), torch.randn(1, 1, 3, 3), "
        "torch.randn(1, 1, 3, 3), is_causal=True, scale=0.0) (torch: nan)"),
)
