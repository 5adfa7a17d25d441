"""handgrad.catalogue is the one list of ops: every entry has its functional, a registry case, an
nn twin where torch has a module, a convert mapping, a derivation section and the defaults it
claims, and the consumers (MLP, the activation spec table, the app) offer exactly its names."""
from __future__ import annotations

import ast
import inspect
import re
import sys
import typing
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

import handgrad
import handgrad.functional as HF
import handgrad.nn as hnn
from handgrad import catalogue
from handgrad.catalogue import CATALOGUE
from handgrad.ops.activations import ACTIVATIONS
from handgrad.testing.registry import all_cases

ROOT = Path(__file__).resolve().parents[1]
OPS = catalogue.ops()
ids = lambda op: op.name  # noqa: E731
convert_module = sys.modules["handgrad.convert"]  # ``handgrad.convert`` is the function

# handgrad.functional names that are not ops (helpers, types); none today
NOT_OPS: frozenset[str] = frozenset()
# signature arguments that are not options: torch's deprecated reduction flags, its private stack level
NOT_OPTIONS = frozenset({"size_average", "reduce", "_stacklevel"})
# (op, option) where torch's default differs on purpose, with why. Each must still differ.
TORCH_DIFFERS = {
    ("linear", "bias"): "nn.Linear's bias is a flag (True); F.linear's is the tensor (None)",
    ("conv1d", "bias"): "nn.Conv1d's bias is a flag (True); F.conv1d's is the tensor (None)",
    ("conv2d", "bias"): "nn.Conv2d's bias is a flag (True); F.conv2d's is the tensor (None)",
}


def _case_op(case_name: str) -> str:
    """``'cross_entropy[sum,weight]'`` → ``'cross_entropy'``."""
    return case_name.split("[", 1)[0]


def _case_variant(case_name: str) -> list[str]:
    """``'mlp[relu,last=None]'`` → ``['relu', 'last=None']``."""
    return case_name[len(_case_op(case_name)) + 1:-1].split(",") if "[" in case_name else []


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces → hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: Counter = Counter()
    out = set()
    for line in path.read_text().splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            slug = _slug(m.group(1))
            out.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")  # GitHub numbers repeats
            seen[slug] += 1
    return out


ANCHORS = _anchors(ROOT / "docs" / "derivation.md")


def _doc_defaults(fn) -> dict:
    """The defaults a builtin without a signature states in its docstring: at its head
    (``scaled_dot_product_attention(query, key, value, attn_mask=None, ...) -> Tensor:``) and on
    each overload's line (``.. function:: mean(input, dim, keepdim=False, *, dtype=None, out=None)
    -> Tensor``), keyword-only ones included."""
    doc = fn.__doc__ or ""
    out = {}
    for head in (" ".join(doc.split(" -> ")[0].split()), *re.findall(r"^(?:\.\. function:: )?(\w+\(.*\)) -> ", doc, re.M)):
        m = re.match(r"\w+\((.*)\)$", head)
        if not m:
            continue
        args = ast.parse(f"def f({m.group(1)}): pass").body[0].args
        out.update({a.arg: ast.literal_eval(d) for a, d in zip(args.args[len(args.args) - len(args.defaults):], args.defaults)})
        out.update({a.arg: ast.literal_eval(d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None})
    return out


def _defaults(fn) -> dict:
    """The defaulted arguments of ``fn``'s signature (those that are options)."""
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty and n not in NOT_OPTIONS}


# --- the table itself ---------------------------------------------------------------------------


def test_functional_and_catalogue_name_the_same_ops():
    assert set(HF.__all__) - NOT_OPS - set(CATALOGUE) == set(), "a functional op with no catalogue entry"
    assert set(CATALOGUE) - set(HF.__all__) == set(), "a catalogue entry with no public functional"


def test_lookups():
    assert catalogue.get("relu") is CATALOGUE["relu"]
    assert [op.name for op in catalogue.ops("activation")] == list(catalogue.activations())
    assert catalogue.activation("gelu") is CATALOGUE["gelu"]
    with pytest.raises(ValueError, match="no op 'swish'"):
        catalogue.get("swish")
    with pytest.raises(ValueError, match="unknown activation 'linear'; expected one of sigmoid"):
        catalogue.activation("linear")  # an op, not an activation
    with pytest.raises(ValueError, match="kind"):
        catalogue.ops("conv")


@pytest.mark.parametrize("op", OPS, ids=ids)
def test_functional(op):
    assert op.functional is getattr(HF, op.name)
    assert op.kind in catalogue.KINDS


# --- every entry: case, twin, convert, section, options -------------------------------------------

CASES = all_cases()


@pytest.mark.parametrize("op", OPS, ids=ids)
def test_registry_case(op):
    assert any(_case_op(c.name) == op.name for c in CASES), f"no registry case named {op.name} or {op.name}[…]"


def test_every_registry_case_is_a_catalogue_op():
    assert {_case_op(c.name) for c in CASES} - set(CATALOGUE) == set()


@pytest.mark.parametrize("op", OPS, ids=ids)
def test_nn_twin(op):
    if op.torch_module is not None:
        assert op.module is not None, f"torch has {op.torch_module.__name__}; handgrad.nn needs a twin"
    if op.module is None:
        assert op.more_modules == ()
        return
    assert op.twin is getattr(hnn, op.module) and op.twins[0] == (op.twin, op.torch_module)
    for twin, torch_module in op.twins:
        assert twin.__name__ in hnn.__all__ and getattr(hnn, twin.__name__) is twin
        if torch_module is None:  # handgrad's own (MLP, HalfSquaredErrorLoss)
            assert getattr(nn, twin.__name__, None) is None, f"torch.nn.{twin.__name__} exists: set torch_module"
            continue
        assert twin.__name__ == torch_module.__name__, "a twin is named as its torch.nn class"
        assert issubclass(twin, torch_module)
        assert twin.forward is not torch_module.forward, "the twin must run handgrad's forward"


def _bare(cls: type[nn.Module]) -> nn.Module:
    """An instance of ``cls`` with Module's state only (convert reads the type, not the arguments)."""
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    return m


MODULES = [(twin, torch_module) for op in OPS for twin, torch_module in op.twins if torch_module is not None]


@pytest.mark.parametrize("twin,torch_module", MODULES, ids=[t.__name__ for t, _ in MODULES])
def test_convert_swaps_the_module(twin, torch_module):
    m = _bare(torch_module)
    handgrad.convert(m, inplace=True)
    assert type(m) is twin
    handgrad.revert(m)
    assert type(m) is torch_module


FUNCTIONS = [(op, f) for op in OPS if op.torch_module is not None for f in op.torch_functions]


@pytest.mark.parametrize("op,f", FUNCTIONS, ids=[f"{op.name}-{convert_module._qual(f)}" for op, f in FUNCTIONS])
def test_convert_swaps_the_function(op, f):
    holder = nn.Module()
    holder.fn = f  # as TransformerEncoderLayer holds its activation
    handgrad.convert(holder, inplace=True)
    assert holder.fn is op.functional
    handgrad.revert(holder)
    assert holder.fn is f


def test_convert_covers_exactly_the_catalogue():
    assert set(convert_module.COVERED_MODULES) == {torch_module for _, torch_module in MODULES}
    assert set(convert_module.COVERED_FUNCTIONS) == {convert_module._qual(f) for _, f in FUNCTIONS}


@pytest.mark.parametrize("op", OPS, ids=ids)
def test_section_is_a_heading(op):
    assert op.section in ANCHORS, f"docs/derivation.md has no heading #{op.section}"


def test_derivation_links_in_src_are_headings():
    links = {(p.relative_to(ROOT), a) for p in (ROOT / "src").rglob("*.py")
             for a in re.findall(r"derivation\.md#([\w-]+)", p.read_text())}
    assert links, "no links found: the pattern is wrong"
    assert {(str(p), a) for p, a in links if a not in ANCHORS} == set()


@pytest.mark.parametrize("op", OPS, ids=ids)
def test_options_are_the_functional_defaults(op):
    assert dict(op.options) == _defaults(op.functional)


@pytest.mark.parametrize("op", [op for op in OPS if op.torch_function is not None], ids=ids)
def test_options_are_torchs_defaults(op):
    try:
        torch_defaults = _defaults(op.torch_function)
    except ValueError:  # a builtin without a signature
        torch_defaults = {}
    if not torch_defaults and op.torch_module is None:  # no module to read: the docstring's signature
        torch_defaults = _doc_defaults(op.torch_function)
    if not torch_defaults and op.torch_module is not None:
        # no signature, or (*args, **kwargs) (F.max_pool2d's boolean dispatch): its module's
        # constructor has the same keywords
        torch_defaults = _defaults(op.torch_module.__init__)
    shared = [k for k in op.options if k in torch_defaults]
    if op.options:  # a bare op (sigmoid, adaptive_avg_pool2d) has nothing to compare
        assert shared, f"no option of {op.name} found in torch's signature: the lookup is wrong"
    for k in shared:
        if (op.name, k) in TORCH_DIFFERS:
            assert op.options[k] != torch_defaults[k], f"torch now agrees; drop {(op.name, k)} from TORCH_DIFFERS"
        else:
            assert op.options[k] == torch_defaults[k], f"{op.name}({k}=…): handgrad {op.options[k]!r}, torch {torch_defaults[k]!r}"


# --- the consumers read it ------------------------------------------------------------------------


def test_activation_spec_table_is_the_catalogues():
    assert tuple(ACTIVATIONS) == catalogue.activations()


@pytest.mark.parametrize("name", catalogue.activations())
def test_mlp_offers_every_activation(name):
    m = hnn.MLP((2, 3, 2), activation=name, last_activation=name)
    assert [type(c) for c in m] == [hnn.Linear, catalogue.get(name).twin, hnn.Linear, catalogue.get(name).twin]
    with pytest.raises(ValueError, match="unknown MLP activation 'linear'"):
        hnn.MLP((2, 3, 2), activation="linear")


def test_app_offers_the_catalogues_activations():
    pytest.importorskip("lightning")
    from train.model import ACTIVATIONS as APP_ACTIVATIONS, build_network

    assert typing.get_args(APP_ACTIVATIONS) == catalogue.activations()
    net = build_network([2, 3, 2], activation="softplus", last_activation="elu", backend="torch")
    assert [type(c) for c in net] == [nn.Linear, nn.Softplus, nn.Linear, nn.ELU]


FUSED_WITH_ACTIVATION = [op for op in catalogue.ops("fused") if "activation" in op.options]


@pytest.mark.parametrize("op,activation", [
    pytest.param(op, a) for op in FUSED_WITH_ACTIVATION for a in catalogue.activations()
], ids=lambda v: getattr(v, "name", v))
def test_fused_cases_cover_every_activation(op, activation):
    # linear_act and mlp take every activation (catalogue.activations()): each needs a case
    assert any(_case_op(c.name) == op.name and _case_variant(c.name)[:1] == [activation] for c in CASES)


def test_fused_ops_take_an_activation():
    assert [op.name for op in FUSED_WITH_ACTIVATION] == ["linear_act", "mlp"]  # the lookup above is not empty
