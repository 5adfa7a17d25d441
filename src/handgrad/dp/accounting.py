"""Privacy accounting: Opacus's accountants (``pip install 'handgrad[dp]'``), never written here.

A DP-SGD step with noise multiplier σ and sampling rate q (each sample in the batch with
probability q, Poisson sampling) is one subsampled Gaussian mechanism; the accountant composes
the steps and converts to (ε, δ): RDP (Mironov 2017; Opacus's ``RDPAccountant``) or PRV (Gopi
et al. 2021, tighter; ``PRVAccountant``).
"""
from __future__ import annotations

import copy
from typing import Any, Literal

__all__ = ["Accountant", "make_accountant", "epsilon_after"]

Accountant = Any  # an opacus.accountants.IAccountant: step(noise_multiplier=, sample_rate=), get_epsilon(delta)
Mechanism = Literal["rdp", "prv", "gdp"]


def make_accountant(mechanism: Mechanism = "rdp") -> Accountant:
    """Opacus's accountant for ``mechanism`` ('rdp', 'prv' or 'gdp'), with no steps yet."""
    try:
        from opacus.accountants import create_accountant
    except ImportError as e:  # the dp extra is not installed
        raise ImportError("privacy accounting uses Opacus's accountants: pip install 'handgrad[dp]' "
                          "(or pip install opacus)") from e
    return create_accountant(mechanism)


def epsilon_after(accountant: Accountant, steps: int, noise_multiplier: float, sample_rate: float,
                  delta: float) -> float:
    """ε at δ once ``steps`` more steps (σ, q) are taken; ``accountant`` itself is left as it is."""
    ahead = copy.deepcopy(accountant)
    for _ in range(steps):
        ahead.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return ahead.get_epsilon(delta=delta)
