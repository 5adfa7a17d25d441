"""Coverage: which of a loss's gradients are hand-derived, and which backward nodes stay native.

    with handgrad.testing.record_coverage(model) as cov:   # names every node by its module
        loss = loss_fn(model(x), y)
    print(cov.report(loss))                                # before loss.backward()

    print(handgrad.testing.coverage(loss, model))          # without recording: modules named
                                                           # through the parameters only

Read off the autograd graph from ``loss.grad_fn`` (before ``backward`` frees it):

- a **parameter** is hand-derived when every layer-level node its gradient flows out of
  (through the structural nodes below, down to its ``AccumulateGrad``) is a handgrad node;
  ``native`` when none is; ``mixed`` otherwise (a weight used by a handgrad and a native op).
- a **handgrad node** is the backward of a ``HandFunction`` (``node._forward_cls`` subclasses
  ``handgrad.ops._function.HandFunction``); every other node is native.
- a **layer-level node** is any node but the structural ones (``STRUCTURAL``): layout and
  plumbing with no math of a layer's own, whose backward is a view, a copy or a sum of
  gradients, the same whoever derived it.
- **module names**: ``record_coverage`` hooks every module's forward and gives each node the
  innermost module whose call created it (the nodes between the call's input and output nodes);
  nodes created outside every module call (a loss computed after ``model(x)``) are
  ``(outside the model)``. Without recording, a node is named by the module of the parameter it
  feeds, and the rest are ``(unnamed)``.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..ops._function import HandFunction

__all__ = ["CoverageReport", "NodeCoverage", "STRUCTURAL", "coverage", "is_handgrad_node", "record_coverage"]

#: backward node kinds (``AddBackward0`` → ``Add``) that are not counted as layer-level nodes,
#: with the reason. Everything else counts, whatever its size.
STRUCTURAL: Mapping[str, str] = MappingProxyType({
    "AccumulateGrad": "stores a leaf's gradient",
    "View": "view/flatten/unflatten: the gradient is reshaped back",
    "UnsafeView": "view (of a matmul's result): reshaped back",
    "AsStrided": "strided view: scattered back",
    "Alias": "alias: passed through",
    "Expand": "broadcast: summed back over the broadcast dims",
    "Permute": "permute: permuted back",
    "Transpose": "transpose: transposed back",
    "T": "matrix transpose (a stored-transposed weight): transposed back",
    "Squeeze": "squeeze: unsqueezed back",
    "Unsqueeze": "unsqueeze: squeezed back",
    "Select": "x[i]: scattered back into zeros",
    "Slice": "x[a:b]: scattered back into zeros",
    "Index": "x[idx]: scattered back into zeros",
    "Unbind": "unbind: stacked back",
    "Split": "split/chunk: concatenated back",
    "SplitWithSizes": "split: concatenated back",
    "Cat": "cat: split back",
    "Stack": "stack: unbound back",
    "Add": "residual and bias adds: the gradient passed to both operands",
    "Sub": "difference: the gradient passed on, negated for one operand",
    "Clone": "copy / contiguous: passed through",
    "ToCopy": "dtype or device cast (autocast): cast back",
    "ConstantPadNd": "zero padding: cropped back",
    "Repeat": "repeat: summed back over the copies",
})

OUTSIDE = "(outside the model)"
UNNAMED = "(unnamed)"
_SUFFIX = re.compile(r"Backward\d*$")


def node_kind(node) -> str:
    """``AddmmBackward0`` → ``Addmm``; ``AccumulateGrad`` stays."""
    return _SUFFIX.sub("", type(node).__name__)


def is_handgrad_node(node) -> bool:
    """Whether ``node`` is the backward of a handgrad Function."""
    cls = getattr(node, "_forward_cls", None)
    return isinstance(cls, type) and issubclass(cls, HandFunction)


def _is_structural(node) -> bool:
    return not is_handgrad_node(node) and node_kind(node) in STRUCTURAL


@dataclass(frozen=True)
class NodeCoverage:
    module: str      # qualified module name ("" is the model itself), or OUTSIDE / UNNAMED
    node: str        # the backward node's type name (``AddmmBackward0``, ``LinearFnBackward``)
    handgrad: bool


@dataclass
class CoverageReport:
    """What ``coverage`` found. ``parameters``: name → ``"handgrad"`` / ``"native"`` /
    ``"mixed"`` for every parameter the loss depends on; ``unused``: parameters requiring grad
    it does not depend on; ``nodes``: every layer-level node; ``ignored``: the structural nodes
    passed over, by kind."""

    parameters: dict[str, str] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    nodes: list[NodeCoverage] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)

    @property
    def handgrad_parameters(self) -> list[str]:
        return [n for n, s in self.parameters.items() if s == "handgrad"]

    @property
    def native_parameters(self) -> list[str]:
        """Parameters some of whose gradient a native node produces (``native`` and ``mixed``)."""
        return [n for n, s in self.parameters.items() if s != "handgrad"]

    @property
    def percent(self) -> float | None:
        """% of the parameters (tensors) the loss depends on whose gradient is hand-derived;
        None when it depends on none."""
        return 100.0 * len(self.handgrad_parameters) / len(self.parameters) if self.parameters else None

    @property
    def native_nodes(self) -> list[NodeCoverage]:
        return [n for n in self.nodes if not n.handgrad]

    @property
    def fully_handgrad(self) -> bool:
        """Every parameter's gradient and every layer-level node is handgrad's."""
        return not self.native_parameters and not self.native_nodes

    def summary(self) -> str:
        if self.parameters:
            hand = sum(self.numel[n] for n in self.handgrad_parameters)
            total = sum(self.numel.values())
            params = (f"{len(self.handgrad_parameters)}/{len(self.parameters)} parameters ({self.percent:.1f}%; "
                      f"{hand:,}/{total:,} elements) get a hand-derived gradient")
        else:
            params = "no parameters"
        native = len(self.native_nodes)
        return (f"handgrad coverage: {params}; layer-level backward nodes: {len(self.nodes) - native} handgrad, "
                f"{native} native")

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.native_parameters:
            lines.append("  parameters with a native gradient:")
            lines += [f"    {n}  ({self.parameters[n]})" for n in self.native_parameters]
        if self.native_nodes:
            lines.append("  native layer-level nodes, by module:")
            counts = Counter((n.module, n.node) for n in self.native_nodes)
            width = max(len(_shown(m)) for m, _ in counts)
            lines += [f"    {_shown(m):<{width}}  {node}" + (f" x{k}" if k > 1 else "")
                      for (m, node), k in counts.items()]
        if self.unused:
            lines.append("  parameters the loss does not depend on: " + ", ".join(self.unused))
        return "\n".join(lines)

    def as_dict(self) -> dict:
        """Plain data, for a logger or a JSON file."""
        return {"percent": self.percent, "fully_handgrad": self.fully_handgrad, "parameters": dict(self.parameters),
                "unused": list(self.unused), "native_nodes": [vars(n).copy() for n in self.native_nodes],
                "handgrad_nodes": sum(n.handgrad for n in self.nodes), "ignored": dict(self.ignored)}


def _shown(module: str) -> str:
    return module or "<model>"


def _graph(root) -> tuple[list, dict]:
    """Every node reachable from ``root`` (in discovery order) and each node's parents."""
    order, parents, stack, seen = [], {}, [root], {root}
    while stack:
        node = stack.pop()
        order.append(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            parents.setdefault(child, []).append(node)
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return order, parents


def _producers(leaf_node, parents: dict) -> list:
    """The layer-level nodes a leaf's gradient flows out of: its ancestors reached through
    structural nodes only."""
    found, stack, seen = [], list(parents.get(leaf_node, ())), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if _is_structural(node):
            stack.extend(parents.get(node, ()))
        else:
            found.append(node)
    return found


def coverage(loss: torch.Tensor, model: nn.Module, *, recording: "record_coverage | None" = None) -> CoverageReport:
    """The coverage report of ``loss``'s graph (call it before ``loss.backward()``), naming
    ``model``'s parameters and modules. ``recording``: a ``record_coverage`` of ``model``
    active during the forward that made ``loss`` (``cov.report(loss)`` passes it)."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"coverage: loss must be a tensor, got {type(loss).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"coverage: model must be a torch.nn.Module, got {type(model).__name__}")
    if loss.grad_fn is None:
        raise ValueError("coverage: loss has no autograd graph (grad_fn is None): it does not require grad, or it "
                         "was computed under no_grad")
    names = {id(p): n for n, p in model.named_parameters()}
    order, parents = _graph(loss.grad_fn)
    report = CoverageReport()
    by_node = dict(recording._modules_of(order)) if recording is not None else {}
    fallback = OUTSIDE if recording is not None else UNNAMED
    for node in order:
        if node_kind(node) != "AccumulateGrad":
            continue
        name = names.get(id(node.variable))
        if name is None:
            continue  # an input that requires grad, not a parameter of model
        producers = _producers(node, parents)
        hand = [is_handgrad_node(p) for p in producers]
        report.parameters[name] = "handgrad" if hand and all(hand) else "mixed" if any(hand) else "native"
        report.numel[name] = node.variable.numel()
        for p in producers:
            by_node.setdefault(p, name.rpartition(".")[0])
    report.parameters = {n: report.parameters[n] for n in names.values() if n in report.parameters}  # model order
    report.unused = [n for n, p in model.named_parameters() if p.requires_grad and n not in report.parameters]
    for node in reversed(order):  # leaves first: roughly the forward's order
        if _is_structural(node):
            report.ignored[node_kind(node)] += 1
        else:
            report.nodes.append(NodeCoverage(by_node.get(node, fallback), type(node).__name__, is_handgrad_node(node)))
    return report


class record_coverage:
    """Hooks every module of ``model`` while active, recording which backward nodes each
    module call creates, so that ``report(loss)`` names every node by its module. The graph
    stays referenced by the recording until it is dropped."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"record_coverage: model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._handles: list = []
        self._calls: list[tuple[str, frozenset, list]] = []  # (module name, input nodes, output nodes)
        self._open: dict[int, list[frozenset]] = {}           # module id → input nodes of its open calls

    def __enter__(self) -> "record_coverage":
        for name, m in self.model.named_modules():
            self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post(name), with_kwargs=True, always_call=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _pre(self, module, args, kwargs):
        self._open.setdefault(id(module), []).append(_nodes((args, kwargs)))

    def _post(self, name: str):
        def hook(module, args, kwargs, output):
            inputs = self._open[id(module)].pop()
            self._calls.append((name, inputs, list(_nodes(output))))
        return hook

    def _modules_of(self, order: list):
        """node → the innermost module whose call created it, for the nodes of ``order``."""
        in_graph, owner = set(order), {}
        for name, inputs, outputs in self._calls:
            depth = name.count(".") + 1 if name else 0
            stack, seen = [n for n in outputs if n in in_graph], set()
            while stack:
                node = stack.pop()
                if node in seen or node in inputs:
                    continue
                seen.add(node)
                if node not in owner or owner[node][0] < depth:
                    owner[node] = (depth, name)
                stack.extend(c for c, _ in node.next_functions if c is not None)
        return ((node, name) for node, (_, name) in owner.items())

    def report(self, loss: torch.Tensor) -> CoverageReport:
        """``coverage(loss, model)`` with every node named by its module."""
        return coverage(loss, self.model, recording=self)


def _nodes(tree) -> frozenset:
    """The grad_fn of every tensor in a (nested) argument or output structure."""
    return frozenset(t.grad_fn for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.grad_fn is not None)
