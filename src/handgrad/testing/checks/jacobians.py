"""Jacobian engines and gradients: fn's output tensors (``outputs``), the full Jacobian by central
differences (``jac_numerical``) and by reverse mode (``jac_reverse``), ∂L/∂x for L = Σ⟨out, v⟩
(``outputs_and_grads``), and the block-by-block comparisons the checks make with them."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..tolerances import FD_EPS
from .measure import Worst, locate_jac, short


def outputs(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of fn's output (a tensor, or any nesting of tuples/lists/dicts)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in outputs(o)]
    return []


def jac_numerical(f: Callable[..., list[torch.Tensor]], xs: Sequence[torch.Tensor],
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


def jac_reverse(f: Callable[..., list[torch.Tensor]],
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


def compare_jacobians(w: Worst, got, expected, out_labels, out_shapes, in_labels, in_shapes,
                       subject: Callable[[int, int], str]) -> None:
    """Every block J[o][i]; ``subject(o, i)`` names it in a failure message."""
    for o in range(len(expected)):
        for i in range(len(in_labels)):
            w.add(got[o][i], expected[o][i], subject(o, i),
                  locate_jac(out_shapes[o], out_labels[o], in_shapes[i], short(in_labels[i])))


def outputs_and_grads(f: Callable, xs: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], create_graph: bool = False):
    """fn's outputs and ∂L/∂x for L = Σ_o ⟨out_o, v_o⟩ (None where an input is unused)."""
    outs = outputs(f(*xs))
    pairs = [(o, v) for o, v in zip(outs, vs) if o.requires_grad]
    if not pairs or not any(x.requires_grad for x in xs):
        return outs, [None] * len(xs)
    wrt = [x for x in xs if x.requires_grad]
    got = iter(torch.autograd.grad([p[0] for p in pairs], wrt, [p[1].to(p[0].dtype) for p in pairs],
                                   create_graph=create_graph, allow_unused=True))
    return outs, [next(got) if x.requires_grad else None for x in xs]
