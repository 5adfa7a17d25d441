r"""``capture(model, grads=True)`` and ``norms(model)``: the bookkeeping around the rules.

How a per-sample quantity is recorded: on entering, each covered module gets a forward hook;
in a forward inside the capture, the hook keeps the module's input x and registers a hook on
the output Y. That tensor hook is the identity tap: in backward it receives G = ∂L/∂Y, hands
it on unchanged, and runs the module's rule (``_rules``) on (x, G). A tensor hook rather than
an identity Function, so that an in-place op after the layer (``ReLU(inplace=True)``) still
works: the hook receives the gradient of Y as the layer produced it. MultiheadAttention's
projections are tapped inside ``functional/_mha.py`` (``PROJECTION_TAP``), and an ``MLP`` runs
its layers one by one (``fused=False``, the same values and gradients) so each Linear is tapped.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_leaves

from .. import nn as hnn
from ..functional._mha import PROJECTION_TAP
from ._formulas import sq
from ._rules import Part, projection_parts, refusal, rule_for

__all__ = ["capture", "norms", "record_of"]

_STATE = "_handgrad_per_sample"   # on the model: the last capture's record, read by norms()


def _owned(m: nn.Module):
    """m's own trainable parameters (its ``_parameters``: no walk of the submodules)."""
    return [p for p in m._parameters.values() if p is not None and p.requires_grad]


class _Record:
    """What one capture has recorded: the sample count, the parameters seen, and (grads=False)
    each parameter's per-sample squared norm by the rows it covers."""

    def __init__(self, grads: bool, index: int):
        self.grads = grads
        self.active = False
        self.index = index         # the model's captures so far, this one included (DP-SGD's accumulation check)
        self.forwards = 0          # forwards of the model itself (with grad) inside this capture
        self.n: int | None = None
        self.params: dict[int, nn.Parameter] = {}
        self.sq: dict[tuple[int, int | None], torch.Tensor] = {}   # (id(param), first row) → (N,)
        self.sinks: dict[int, str] = {}   # id of each captured parameter → its name
        self.inside: set = set()          # the graph nodes a covered layer's forward made (this capture's)
        self.reached: set[int] = set()    # the captured parameters a covered layer's nodes use
        self.taps: list = []       # the tapped layer outputs' gradient edges (ghost clipping backpropagates to them)

    def enclose(self, outputs, inputs) -> None:
        """Mark the graph nodes between a covered layer's tensor ``inputs`` and ``outputs`` as its own
        (run per layer per forward: the loop is kept to the set and attribute lookups it needs)."""
        stop, todo = _grad_fns(inputs), _grad_fns(outputs)
        inside, sinks, reached = self.inside, self.sinks, self.reached
        while todo:
            node = todo.pop()
            if node in inside or node in stop:
                continue
            inside.add(node)
            for n, _ in node.next_functions:
                if n is not None:
                    todo.append(n)
                    if (v := _leaf(n)) is not None and id(v) in sinks:
                        reached.add(id(v))

    def check_uses(self, outputs) -> None:
        """Refuse a captured parameter that a node outside every covered layer uses (a weight tied
        through a functional call, ``F.linear(h, emb.weight)``): no rule sees that use, so its
        per-sample gradient would miss that share. One walk over the graph behind ``outputs``."""
        seen, todo = set(), _grad_fns(outputs)
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            for n, _ in node.next_functions:
                if n is None:
                    continue
                if (v := _leaf(n)) is not None and id(v) in self.reached and node not in self.inside:
                    raise RuntimeError(                              # (one no layer reached: __exit__'s check)
                        f"per_sample.capture: {self.sinks[id(v)]} is used outside the handgrad layer that owns it "
                        f"(by {type(node).__name__}: e.g. a weight tied through a functional call such as "
                        "F.linear(h, emb.weight)); no per-sample rule sees that use, so its per-sample gradient "
                        "would be wrong. Tie it through modules instead (decoder.weight = emb.weight, both "
                        "handgrad layers: their shares are summed), or untie it")
                todo.append(n)

    def add(self, parts: list[Part], where: str) -> None:
        for part in parts:
            p = part.param
            N = (part.grad if part.sq_norm is None else part.sq_norm).shape[0]
            if self.n is None:
                self.n = N
            elif N != self.n:
                raise RuntimeError(f"per_sample.capture: {where} saw {N} samples, earlier layers {self.n}; "
                                   "the sample dimension must be the first of every layer's input, and every "
                                   "backward in one capture must be over the same samples")
            self.params.setdefault(id(p), p)
            if self.grads:
                g = part.grad if part.grad.dtype == p.dtype else part.grad.to(p.dtype)   # fresh (the formulas')
                old = getattr(p, "grad_sample", None)
                if old is None and part.rows is not None:
                    old = p.grad_sample = g.new_zeros((N, *p.shape))
                if old is None:
                    p.grad_sample = g
                else:                                                   # accumulates as .grad does
                    (old if part.rows is None else old[:, part.rows]).add_(g)
            else:
                key = (id(p), None if part.rows is None else part.rows.start)
                if key in self.sq:
                    raise RuntimeError(
                        f"per_sample.capture(grads=False): {where} gave a second contribution to the same "
                        "parameter (a layer used twice, or a second backward); squared norms of the parts do "
                        "not add up to the norm of their sum, so use grads=True")
                sq_norm = part.sq_norm
                self.sq[key] = sq_norm if sq_norm.dtype in (torch.float32, torch.float64) else sq_norm.float()

    def sq_norms(self) -> torch.Tensor:
        if self.n is None:
            raise RuntimeError("per_sample.norms: nothing was recorded; run the forward and the backward "
                               "inside `with per_sample.capture(model):`")
        if self.grads:
            parts = [sq(p.grad_sample) for p in self.params.values()
                     if getattr(p, "grad_sample", None) is not None]
        else:
            parts = list(self.sq.values())
        return torch.stack(parts).sum(0)


class capture:
    r"""Record per-sample gradients of ``model``'s parameters in the forward and backward passes
    run inside the ``with`` block.

    ``grads=True``: each parameter ``p`` of a covered layer gets ``p.grad_sample`` (N, *p.shape),
    ∂Cⁿ/∂p scaled as the loss's reduction scales it, so ``p.grad_sample.sum(0)`` equals the
    ``p.grad`` of the same backward; several backward calls add up, as ``.grad`` does.
    ``grads=False``: only the per-sample squared norms are kept (nothing of shape
    (N, *p.shape) for the weights whose Gram form is cheaper), read with ``norms(model)``.

    N is the first dimension of each layer's input (MultiheadAttention: its batch dimension);
    sequence layers (N, T, D) sum over T within a sample. Covered: handgrad's Linear, Conv1d,
    Conv2d, LayerNorm, GroupNorm, RMSNorm, Embedding, BatchNorm in eval mode, MLP (run
    unfused), MultiheadAttention's projections. Refused with an error naming the module:
    batch norm with batch statistics (training mode), and any module with trainable parameters
    of its own that is not one of these (convert it with ``handgrad.convert`` first), and a
    captured parameter that something outside its layer also uses (a weight tied through a
    functional call, ``F.linear(h, emb.weight)``; checked at the end of each forward of
    ``model`` itself). Tying through modules (``decoder.weight = emb.weight``, both handgrad
    layers) is captured: grad_sample sums both uses. ``torch.utils.checkpoint`` works in both
    forms (the reentrant one records in the recomputation inside backward).
    Entering clears the ``grad_sample`` of the model's parameters; a backward through the
    capture's graph after it closed records nothing.
    """

    def __init__(self, model: nn.Module, grads: bool = True):
        self.model, self.grads = model, bool(grads)
        self._handles: list = []
        self._unfused: list[hnn.MLP] = []

    def __enter__(self) -> "capture":
        if getattr(getattr(self.model, _STATE, None), "active", False):
            raise RuntimeError("per_sample.capture: this model is already inside a capture (they do not nest)")
        record = _Record(self.grads, getattr(getattr(self.model, _STATE, None), "index", 0) + 1)
        modules = list(self.model.named_modules())   # one walk; parameters from each module's own dict
        params: dict[int, tuple[str, nn.Parameter]] = {}
        for name, m in modules:
            for k, p in m._parameters.items():
                if p is not None and id(p) not in params:
                    params[id(p)] = (f"{name}.{k}" if name else k, p)
        plan, inner = [], set()      # inner: MultiheadAttention's out_proj, whose forward is never called
        for name, m in modules:
            if id(m) in inner:
                continue
            where = f"{name or '<model>'} ({type(m).__name__})"
            reason = refusal(m)
            if reason is not None:
                raise RuntimeError(f"per_sample.capture: cannot take {where}: {reason}")
            if isinstance(m, hnn.MultiheadAttention) and type(m).forward is hnn.MultiheadAttention.forward:
                plan.append((m, where, None))
                inner.add(id(m.out_proj))
                owned = [p for p in m.parameters() if p.requires_grad]
            elif (rule := rule_for(m)) is not None:
                plan.append((m, where, rule))
                owned = _owned(m)
            elif _owned(m):
                raise TypeError(
                    f"per_sample.capture: {where} has trainable parameters but is not a handgrad layer with a "
                    "per-sample rule; convert the model with handgrad.convert, or freeze it (requires_grad=False)")
            else:
                continue
            record.sinks.update((id(p), params[id(p)][0]) for p in owned)
        self._params = [p for _, p in params.values()]
        self._names = {i: name for i, (name, _) in params.items()}
        for p in self._params:
            if hasattr(p, "grad_sample"):
                del p.grad_sample
        for m, where, rule in plan:
            if rule is None:
                self._handles += [m.register_forward_pre_hook(self._mha_enter(m, where, record), with_kwargs=True),
                                  m.register_forward_hook(self._mha_exit(record), with_kwargs=True, always_call=True)]
            else:
                self._handles.append(m.register_forward_hook(self._tap(rule, where, record, _may_refuse(m))))
        self._handles.append(self.model.register_forward_hook(self._root_exit(record)))
        for _, m in modules:
            if isinstance(m, hnn.MLP) and m.fused:
                m.fused = False
                self._unfused.append(m)
        self._grads_before = {id(p): _grad_state(p) for p in self._params}
        record.active = True
        setattr(self.model, _STATE, record)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for h in self._handles:
            h.remove()
        for m in self._unfused:
            m.fused = True
        self._handles, self._unfused = [], []
        record = getattr(self.model, _STATE)
        record.active = False
        record.inside, record.taps = set(), []   # graph nodes and outputs: not kept past the capture
        if exc_type is None:       # never silently skipped: a gradient that no rule saw
            missed = [self._names[id(p)] for p in self._params
                      if id(p) not in record.params and p.grad is not None
                      and _grad_state(p) != self._grads_before.get(id(p))]
            if missed:
                raise RuntimeError(
                    f"per_sample.capture: {', '.join(missed)} received a gradient inside the capture but no "
                    "per-sample rule saw it (a layer whose forward runs inside another op, or a parameter used "
                    "outside its module); its per-sample gradient is unknown")

    def _tap(self, rule, where, record, may_refuse):
        grads = self.grads

        def forward_hook(module, args, output):
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return None
            reason = refusal(module) if may_refuse else None   # the mode may have changed (model.train())
            if reason is not None:
                raise RuntimeError(f"per_sample.capture: cannot take {where}: {reason}")
            x = args[0]
            _watch(output, x, where, lambda G: rule(module, x, G, grads), record)
            record.enclose(output, args)
            return None
        return forward_hook

    @staticmethod
    def _root_exit(record):
        def root_hook(module, args, output):
            if torch.is_grad_enabled():
                record.forwards += 1
                record.check_uses(output)
        return root_hook

    def _mha_enter(self, m, where, record):
        grads = self.grads

        def pre_hook(module, args, kwargs):
            grams: dict = {}           # this forward's Xₙ Xₙᵀ, shared by projections of one input

            def tap(role, x, y, bsz):
                if torch.is_grad_enabled() and y.requires_grad:
                    _watch(y, x, f"{where} {role} projection",
                           lambda G: projection_parts(m, role, x, G, bsz, grads, grams), record)
            PROJECTION_TAP.append(tap)
        return pre_hook

    @staticmethod
    def _mha_exit(record):
        def exit_hook(module, args, kwargs, output):
            if PROJECTION_TAP:                 # always_call: also when the forward raised
                PROJECTION_TAP.pop()
            if output is not None and torch.is_grad_enabled():
                record.enclose(output, (args, kwargs))
        return exit_hook


def _grad_fns(obj) -> list:
    """The grad_fn of every tensor in ``obj`` (a tensor, or a nest of them) that has one. A tuple
    of tensors (a layer's ``args``, the common case) without the pytree walk (~6 µs a call)."""
    if isinstance(obj, torch.Tensor):
        return [] if obj.grad_fn is None else [obj.grad_fn]
    if isinstance(obj, tuple) and all(isinstance(t, torch.Tensor) for t in obj):
        return [t.grad_fn for t in obj if t.grad_fn is not None]
    return [t.grad_fn for t in tree_leaves(obj) if isinstance(t, torch.Tensor) and t.grad_fn is not None]


def _leaf(node):
    """The tensor of an AccumulateGrad node (a leaf's gradient sink: every use of the leaf has an
    edge to it), else None."""
    return getattr(node, "variable", None)


def _may_refuse(m: nn.Module) -> bool:
    """Whether ``refusal(m)`` can change after entering (batch norm's mode), so each forward asks again."""
    return isinstance(m, (hnn.BatchNorm1d, hnn.BatchNorm2d))


def _grad_state(p: torch.Tensor):
    """What tells that p.grad changed: the tensor and its version (in-place accumulation)."""
    return None if p.grad is None else (id(p.grad), p.grad._version)


def _watch(y: torch.Tensor, x: torch.Tensor, where: str, parts_of, record: _Record) -> None:
    """In backward, G = ∂L/∂y passes unchanged, and ``parts_of(G)`` is recorded."""
    version = x._version

    def hook(G):
        if not record.active:          # a backward after the capture closed, through its graph: not recorded
            return
        if x._version != version:
            raise RuntimeError(f"per_sample.capture: the input of {where} was modified in place after the "
                               "layer ran; its per-sample gradients would use the changed values")
        if not torch.is_grad_enabled():        # a backward without create_graph: nothing records already
            record.add(parts_of(G.detach()), where)
            return
        with torch.no_grad():
            record.add(parts_of(G.detach()), where)
    y.register_hook(hook)
    # the edge as it is now (an in-place op after the layer moves y's). No ownership token (what
    # get_gradient_edge adds for a Python node: one more autograd op per layer, ~10 µs): the taps
    # are used only while the graph is alive (ghost clipping's pass 1, within the capture)
    record.taps.append(GradientEdge(y.grad_fn, y.output_nr) if y.grad_fn is not None else get_gradient_edge(y))


def record_of(model: nn.Module) -> _Record | None:
    """The record of ``model``'s last capture (None: never captured)."""
    return getattr(model, _STATE, None)


def norms(model: nn.Module) -> torch.Tensor:
    r"""‖∂Cⁿ/∂θ‖₂ over every parameter the last ``capture(model)`` recorded: (N,)."""
    record = getattr(model, _STATE, None)
    if record is None:
        raise RuntimeError("per_sample.norms: this model was never captured; use `with per_sample.capture(model):`")
    return record.sq_norms().sqrt()
