"""``convert(model)``: swap the torch.nn modules handgrad covers for their handgrad twins;
``revert(model)``: swap them back.

How a module is swapped: its ``__class__`` is reassigned to the twin (``handgrad.nn``), which
subclasses the torch.nn class and overrides ``forward`` only. The module object itself stays,
so its parameters, buffers, hooks (forward, pre-forward, backward, state_dict hooks), training
mode and any attribute its owner reads (``MultiheadAttention`` reads ``out_proj.weight``) are
untouched, and ``isinstance(m, torch.nn.Linear)`` stays true.

- ``inplace=True``: ``model`` itself is converted; its Parameter objects are the converted
  model's, so an optimizer built on ``model.parameters()`` before the call keeps working.
- ``inplace=False`` (default): a ``copy.deepcopy`` of ``model`` is converted; its parameters are
  copies (same values, new tensors) and ``model`` is left as it was. Build the optimizer on the
  returned model.

Subclasses of a covered class (``NonDynamicallyQuantizableLinear``, a parametrized ``Linear``)
become a class deriving from both the twin and the subclass, so they keep their type; a subclass
that overrides ``forward`` is left alone (its forward is its own math). Module attributes that
hold a covered torch function (``TransformerEncoderLayer.activation = F.relu``) are swapped for
the handgrad function. A ``TransformerEncoderLayer`` with converted parts has its native fast
path (``torch._transformer_encoder_layer_fwd``, taken in eval mode without grad, which reads the
weights directly and never calls the submodules) turned off, so the converted model runs the
handgrad ops in every mode; ``revert`` turns it back on.

``mapping={SomeClass: factory}`` covers classes handgrad does not know (a third-party linear
that stores its weight transposed, a model library's own RMSNorm): each module of that class
(or of a subclass keeping its ``forward``) is replaced, in its parent, by ``factory(module)``,
a module computing the same function with handgrad ops and holding the very same Parameters
(and buffers) under the same names; ``convert`` checks that, so the state_dict keys and an
optimizer built on the parameters are unchanged. Mapping entries come before the built-in twins
(a mapping for ``torch.nn.Linear`` replaces the twin swap). The replacement keeps the module it
replaced (``_handgrad_original_module``), and ``revert`` puts that very object back. The
factory answers for the replaced module's subtree; the replacement's own submodules are
converted as any others.

The returned model carries ``model.handgrad_report`` (a ``ConversionReport``: print it, log it,
or read its lists); the one-line summary is also logged to the ``handgrad.convert`` logger at
INFO level.
"""
from __future__ import annotations

import copy
import fnmatch
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Union

import torch
import torch.nn.functional as TF
from torch import nn

from . import catalogue
from . import functional as HF
from .nn import MLP

__all__ = ["convert", "revert", "ConversionReport", "Swap", "COVERED_MODULES", "COVERED_FUNCTIONS"]

logger = logging.getLogger("handgrad.convert")

# The tables below are read off the catalogue (handgrad.catalogue); none names an op itself.
# torch.nn class → its handgrad.nn twin, for every op with a torch.nn class.
TWINS: dict[type[nn.Module], type[nn.Module]] = {
    torch_module: twin for op in catalogue.ops() for twin, torch_module in op.twins if torch_module is not None
}
#: torch.nn module classes ``convert`` swaps (subclasses that keep torch's forward included).
COVERED_MODULES: tuple[type[nn.Module], ...] = tuple(TWINS)
_REVERSE: dict[type[nn.Module], type[nn.Module]] = {twin: base for base, twin in TWINS.items()}
# handgrad modules with no torch.nn class (MLP, HalfSquaredErrorLoss): never swapped
_HANDGRAD_ONLY = tuple(op.twin for op in catalogue.ops() if op.module is not None and op.torch_module is None)

# torch function → (handgrad.functional name, the torch.nn module type it stands for in
# include/exclude): every torch spelling of the ops with a torch.nn class. (The fused ops have
# none, and linear_cross_entropy's signature is not torch's, so a held F.linear_cross_entropy
# stays native.)
_FUNCTIONS: dict[object, tuple[str, type[nn.Module]]] = {
    f: (op.name, op.torch_module) for op in catalogue.ops() if op.torch_module is not None for f in op.torch_functions
}
#: torch functions held as module attributes that ``convert`` swaps, by name.
COVERED_FUNCTIONS: tuple[str, ...]  # filled in below, once _qual is defined

_PATCHES = "_handgrad_patches"  # per-module {attribute: value before convert}, for revert
_ORIGINAL = "_handgrad_original_module"  # on a mapping's replacement: the module it replaced, for revert

Selector = Union[str, type, Iterable[Union[str, type]], None]


# ---------------------------------------------------------------------------------------------
# the report


@dataclass(frozen=True)
class Swap:
    name: str     # qualified name in the model ("" is the model itself)
    before: str   # type or function before
    after: str    # type or function after (for a skipped module: the reason)
    note: str = ""


@dataclass
class ConversionReport:
    """What ``convert`` did: ``swapped`` modules, swapped function ``attributes``, ``patched``
    flags (fast paths turned off), ``skipped`` covered modules (excluded, or with their own
    forward) and ``native``: modules with no handgrad twin, counted by type (containers without
    parameters of their own are not counted)."""

    swapped: list[Swap] = field(default_factory=list)
    attributes: list[Swap] = field(default_factory=list)
    patched: list[Swap] = field(default_factory=list)
    skipped: list[Swap] = field(default_factory=list)
    native: Counter = field(default_factory=Counter)
    already: int = 0  # modules that were handgrad modules before the call

    def summary(self) -> str:
        by_type = Counter(s.before.rsplit(".", 1)[-1] for s in self.swapped)
        parts = [f"swapped {len(self.swapped)} module(s)" + (f" ({_counts(by_type)})" if by_type else "")]
        if self.attributes:
            by_fn = Counter(s.before.rsplit(".", 1)[-1] for s in self.attributes)
            parts.append(f"{len(self.attributes)} function attribute(s) ({_counts(by_fn)})")
        if self.patched:
            parts.append(f"{len(self.patched)} native fast path(s) turned off")
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)}")
        if self.already:
            parts.append(f"{self.already} already handgrad")
        parts.append("left native: " + (_counts(self.native) if self.native else "nothing"))
        return "handgrad.convert: " + "; ".join(parts)

    def __str__(self) -> str:
        lines = [self.summary()]
        for title, rows, arrow in (("swapped", self.swapped, "->"), ("function attributes", self.attributes, "->"),
                                   ("fast paths off", self.patched, "->"), ("skipped", self.skipped, ":")):
            if rows:
                lines.append(f"  {title}:")
                width = max(len(r.name or "<model>") for r in rows)
                for r in rows:
                    note = f"  ({r.note})" if r.note else ""
                    lines.append(f"    {(r.name or '<model>'):<{width}}  {r.before} {arrow} {r.after}{note}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        """Plain data, for a logger or a JSON file."""
        rows = lambda xs: [vars(x).copy() for x in xs]  # noqa: E731
        return {"swapped": rows(self.swapped), "attributes": rows(self.attributes), "patched": rows(self.patched),
                "skipped": rows(self.skipped), "native": dict(self.native), "already": self.already}


def _counts(counter: Counter) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counter.items()))


def _qual(t) -> str:
    """The name a user writes: ``torch.nn.Linear``, ``torch.nn.functional.relu``, ``torch.relu``."""
    if isinstance(t, type):
        if getattr(nn, t.__name__, None) is t:
            return f"torch.nn.{t.__name__}"
        return f"{t.__module__}.{t.__qualname__}"
    for prefix, namespace in (("torch.nn.functional", TF), ("torch", torch)):
        if getattr(namespace, t.__name__, None) is t:
            return f"{prefix}.{t.__name__}"
    return f"{getattr(t, '__module__', None)}.{t.__name__}"


# ---------------------------------------------------------------------------------------------
# twins of subclasses: a class deriving from (twin, subclass), picklable


COVERED_FUNCTIONS = tuple(sorted(_qual(f) for f in _FUNCTIONS))

_MIXED: dict[tuple[type, type], type] = {}


def _mixed_class(twin: type, cls: type) -> type:
    """The twin's ``forward`` on a subclass of the twin's torch class, keeping the subclass's
    type (``isinstance`` and ``repr`` unchanged). Pickled through ``_new_mixed``, because the
    class is made at run time."""
    key = (twin, cls)
    if key not in _MIXED:
        _MIXED[key] = type(cls.__name__, (twin, cls), {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": f"{cls.__qualname__} with the forward of handgrad.nn.{twin.__name__} (made by handgrad.convert).",
            "__reduce_ex__": _reduce_mixed,
            "_handgrad_original": cls,
        })
    return _MIXED[key]


def _new_mixed(twin: type, cls: type):
    return object.__new__(_mixed_class(twin, cls))


def _reduce_mixed(self, protocol):
    rv = object.__reduce_ex__(self, protocol)  # (copyreg.__newobj__, (cls,), state, ...)
    cls = type(self)
    return (_new_mixed, (cls.__bases__[0], cls._handgrad_original), *rv[2:])


def _is_handgrad(cls: type) -> bool:
    return cls in _REVERSE or "_handgrad_original" in vars(cls) or issubclass(cls, _HANDGRAD_ONLY)


def _covered_base(cls: type) -> type | None:
    return next((k for k in cls.__mro__ if k in TWINS), None)


# ---------------------------------------------------------------------------------------------
# selection


def _entries(sel: Selector) -> list | None:
    if sel is None:
        return None
    if isinstance(sel, (str, type)):
        return [sel]
    out = list(sel)
    for e in out:
        if not isinstance(e, (str, type)):
            raise TypeError(f"convert: include/exclude entries must be module types or name patterns (str), got {type(e).__name__}")
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]


def _matches(entries: list, name: str, kind: type) -> bool:
    for e in entries:
        if isinstance(e, type):
            if issubclass(kind, _REVERSE.get(e, e)):
                return True
        elif any(fnmatch.fnmatchcase(a, e) for a in _ancestors(name) if a or e == ""):
            return True
    return False


def _selected(include, exclude, name: str, kind: type) -> bool:
    if include is not None and not _matches(include, name, kind):
        return False
    return not (exclude is not None and _matches(exclude, name, kind))


# ---------------------------------------------------------------------------------------------
# convert / revert


def _patch(module: nn.Module, attr: str, value) -> None:
    patches = module.__dict__.setdefault(_PATCHES, {})
    patches.setdefault(attr, getattr(module, attr))
    setattr(module, attr, value)


def _check_mapping(mapping) -> dict[type, Callable]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise TypeError(f"convert: mapping must be a dict {{module class: factory}}, got {type(mapping).__name__}")
    for cls, factory in mapping.items():
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"convert: mapping keys must be torch.nn.Module classes, got {cls!r}")
        if not callable(factory):
            raise TypeError(f"convert: mapping[{cls.__qualname__}] must be a callable factory(module), got "
                            f"{type(factory).__name__}")
    return dict(mapping)


def _check_replacement(name: str, old: nn.Module, new) -> None:
    """The factory's module holds the original's Parameters and buffers, by name: the same
    objects, so the state_dict keys and the optimizer's parameters stay."""
    what = f"convert: mapping[{type(old).__qualname__}] for {name or '<model>'!r}"
    if not isinstance(new, nn.Module):
        raise TypeError(f"{what} returned {type(new).__name__}, not a torch.nn.Module")
    before, after = old.state_dict(keep_vars=True), new.state_dict(keep_vars=True)
    params_before, params_after = dict(old.named_parameters()), dict(new.named_parameters())
    if list(before) != list(after) or list(params_before) != list(params_after):
        raise ValueError(f"{what} changed the state_dict keys or parameter names: {list(before)} -> {list(after)}; "
                         "the replacement must hold the original's Parameters and buffers under the same names")
    moved = [k for k in before if after[k] is not before[k]] + [k for k in params_before
                                                                 if params_after[k] is not params_before[k]]
    if moved:
        raise ValueError(f"{what} holds new tensors for {sorted(set(moved))}; the replacement must share the "
                         "original's Parameter (and buffer) objects, not copies")


def _apply_mapping(model: nn.Module, mapping: dict, include, exclude,
                   report: ConversionReport) -> tuple[nn.Module, set[int]]:
    """Replace, top-down, each module of a mapped class by its factory's module; returns the
    (possibly replaced) model and the ids of the replacements."""
    made: dict[int, nn.Module] = {}   # id(original) → replacement: a module shared by two parents is replaced once

    def visit(name: str, m: nn.Module) -> nn.Module:
        if id(m) in made:
            return made[id(m)]
        cls = type(m)
        base = next((k for k in cls.__mro__ if k in mapping), None)
        if base is not None and not _is_handgrad(cls) and _ORIGINAL not in vars(m):
            if not _selected(include, exclude, name, base):
                report.skipped.append(Swap(name, _qual(cls), "excluded by include/exclude"))
            elif cls is not base and cls.forward is not base.forward:
                report.skipped.append(Swap(name, _qual(cls), f"overrides {base.__name__}.forward; left native"))
            else:
                new = mapping[base](m)
                _check_replacement(name, m, new)
                new.__dict__[_ORIGINAL] = m   # not setattr: that would register it as a submodule
                made[id(m)] = new
                report.swapped.append(Swap(name, _qual(cls), _qual(type(new)), "mapping"))
                return new
        for key, child in list(m._modules.items()):
            if child is not None:
                new_child = visit(f"{name}.{key}" if name else key, child)
                if new_child is not child:
                    m._modules[key] = new_child
        return m

    return visit("", model), {id(m) for m in made.values()}


def convert(model: nn.Module, mapping: Mapping[type, Callable] | None = None, *, include: Selector = None,
            exclude: Selector = None, inplace: bool = False) -> nn.Module:
    """Swap every torch.nn module handgrad covers (``COVERED_MODULES``) for its handgrad twin.

    ``include`` / ``exclude``: a module type (``torch.nn.Linear``: that type and its
    subclasses), a glob over qualified module names (``"encoder.layers.0"``,
    ``"*.linear?"``; a pattern that matches a module matches everything under it), or a list of
    these. A covered module is swapped when it matches ``include`` (None: everything) and not
    ``exclude``. Function attributes (``TransformerEncoderLayer.activation``) are selected by
    their qualified name (``"layers.0.activation"``) and by the module type they stand for
    (``F.relu``: ``torch.nn.ReLU``).

    ``mapping``: ``{module class: factory}``, ``factory(module)`` returning a module that
    computes the same function with handgrad ops and holds the same Parameters (see the module
    docstring); it comes before the built-in twins and is selected by include/exclude too.

    Returns the converted model (``model`` itself when ``inplace``, else a deep copy; see the
    module docstring; the factory's module when ``model`` itself is of a mapped class), with
    ``handgrad_report`` set to a ``ConversionReport``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    include, exclude = _entries(include), _entries(exclude)
    mapping = _check_mapping(mapping)
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    model, replaced = _apply_mapping(model, mapping, include, exclude, report)
    converted: set[int] = set(replaced)  # ids of modules swapped, replaced or with a function attribute swapped

    for name, m in model.named_modules():
        cls = type(m)
        if id(m) in replaced:
            continue  # the factory's module: its own submodules are visited next
        if _is_handgrad(cls):
            report.already += 1
            continue
        base = _covered_base(cls)
        if base is None:
            if m._parameters or m._buffers or not m._modules:
                if name or not m._modules:  # the model itself counts only as a leaf
                    report.native[cls.__name__] += 1
        elif not _selected(include, exclude, name, base):
            report.skipped.append(Swap(name, _qual(cls), "excluded by include/exclude"))
        elif isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            # its first forward sets __class__ to cls_to_become, which would undo the swap
            report.skipped.append(Swap(name, _qual(cls), "lazy module not yet initialised; convert after its first forward"))
        elif cls is not base and cls.forward is not base.forward:
            report.skipped.append(Swap(name, _qual(cls), f"overrides {base.__name__}.forward; left native"))
        else:
            twin = TWINS[base]
            new = twin if cls is base else _mixed_class(twin, cls)
            m.__class__ = new
            note = ""
            if name.rsplit(".", 1)[-1] == "out_proj" and isinstance(model.get_submodule(name.rpartition(".")[0]), nn.MultiheadAttention):
                note = "MultiheadAttention reads its weight directly (handgrad's passes it to handgrad's linear)"
            report.swapped.append(Swap(name, _qual(cls), f"handgrad.nn.{twin.__name__}" if cls is base else f"handgrad.nn.{twin.__name__} + {cls.__name__}", note))
            converted.add(id(m))
        # torch functions held as plain attributes (TransformerEncoderLayer.activation = F.relu)
        for attr, value in list(vars(m).items()):
            if attr.startswith("_"):
                continue
            try:
                hit = _FUNCTIONS.get(value)
            except TypeError:  # unhashable value
                continue
            if hit is None or not hasattr(HF, hit[0]):
                continue
            full = f"{name}.{attr}" if name else attr
            if not _selected(include, exclude, full, hit[1]):
                report.skipped.append(Swap(full, _qual(value), "excluded by include/exclude"))
                continue
            new_fn = getattr(HF, hit[0])
            _patch(m, attr, new_fn)
            report.attributes.append(Swap(full, _qual(value), f"handgrad.functional.{hit[0]}"))
            converted.add(id(m))

    # Native fast paths that bypass the submodules (torch/nn/modules/transformer.py); the flags
    # are torch's private attributes, named in _compat.
    import warnings

    from ._compat import ENCODER_FAST_PATH_FLAG as FAST, ENCODER_NESTED_FLAG as NESTED, has_encoder_fast_path_flag
    for name, m in model.named_modules():
        if not isinstance(m, nn.TransformerEncoderLayer):
            continue
        if not (any(id(s) in converted for s in m.modules() if s is not m.self_attn) or id(m) in converted):
            continue
        if not has_encoder_fast_path_flag(m):
            warnings.warn(f"convert: torch {torch.__version__}'s TransformerEncoderLayer has no {FAST!r} switch, so "
                          f"{name or 'the model'} in eval mode without grad may take torch's native fast path "
                          f"instead of the handgrad ops", stacklevel=2)
        elif getattr(m, FAST):
            _patch(m, FAST, 0)
            report.patched.append(Swap(name, f"{FAST} (fast path on)", "0 (fast path off)",
                                       "torch._transformer_encoder_layer_fwd never calls the submodules"))
    for name, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoder) and getattr(m, NESTED, False):
            if any(_PATCHES in vars(layer) and FAST in vars(layer)[_PATCHES] for layer in m.layers):
                _patch(m, NESTED, False)
                report.patched.append(Swap(name, f"{NESTED}=True", "False",
                                           "the nested-tensor path needs every layer's fast path"))

    model.handgrad_report = report
    logger.info("%s", report.summary())
    return model


def revert(model: nn.Module) -> nn.Module:
    """Swap handgrad modules back to their torch.nn classes and restore what ``convert``
    changed (function attributes, fast-path flags), in place; returns ``model``.

    Works on any model holding handgrad modules, converted or built from ``handgrad.nn``:
    ``MLP`` becomes the ``torch.nn.Sequential`` it is laid out as. ``HalfSquaredErrorLoss`` has
    no torch.nn twin and stays. The modules a ``mapping`` replaced are put back (the very
    objects); when ``model`` itself was replaced, the original model is returned.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert: model must be a torch.nn.Module, got {type(model).__name__}")
    vars(model).pop("handgrad_report", None)
    model = _restore(model)
    for m in model.modules():
        cls = type(m)
        if cls in _REVERSE:
            m.__class__ = _REVERSE[cls]
        elif "_handgrad_original" in vars(cls):
            m.__class__ = cls._handgrad_original
        elif issubclass(cls, MLP):
            m.__class__ = nn.Sequential
        patches = vars(m).pop(_PATCHES, None)
        for attr, value in (patches or {}).items():
            setattr(m, attr, value)
    vars(model).pop("handgrad_report", None)
    return model


def _restore(m: nn.Module, back: dict[int, nn.Module] | None = None) -> nn.Module:
    """Put back, top-down, the modules a mapping replaced; returns ``m`` or the module it
    replaced. ``back``: replacement id → original, for a replacement held by two parents."""
    back = {} if back is None else back
    if id(m) in back:
        return back[id(m)]
    original = vars(m).pop(_ORIGINAL, None)
    if original is not None:
        back[id(m)] = original
        m = original
    for key, child in list(m._modules.items()):
        if child is not None:
            restored = _restore(child, back)
            if restored is not child:
                m._modules[key] = restored
    return m
