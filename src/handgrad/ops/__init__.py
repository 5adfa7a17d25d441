"""One ``torch.autograd.Function`` per op: the math, and nothing else.
Derivations: docs/derivation.md."""
