"""Fused ops: a whole stack of layers as one autograd node (linear + cross-entropy:
``ops.linear_cross_entropy``).
Derivation: docs/derivation.md#fused-operations.

A hand-derived backward can do what autograd's op-by-op graph cannot: run a whole network's
backward as one step (the seed's Δ recursion), keep only the tensors the derivative uses, and
work in place on buffers it owns.

In place versus double backward. ``backward`` runs with grad mode off unless the caller asked
for ``create_graph=True``. With grad mode off nothing records the backward, so it may overwrite
buffers it allocated itself (the fast path: ``Δ_l`` is written into the ``Δ_{l+1} W_{l+1}``
buffer, ``Δ_l W_l`` over ``Δ_l`` in row blocks where it fits, the softmax into the logits
buffer; in the forward, sigmoid/tanh/relu overwrite the layer's own ``Z_l``). With grad mode on (double backward,
``gradgradcheck``, ``torch.func.grad``), the same equations run out of place, so autograd can
differentiate them. Both paths share every line of math; only ``inplace`` differs.

The activation math (f and f') comes from ``ops.activations`` (one ``Activation`` spec per f):
nothing here writes a derivative of an activation again (STYLE.md §4).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._compat import forward_ad_active, functorch_transforms_active, saved_tensors_hooks_active
from ._function import HandFunction, opmath
from .activations import Activation, ElementwiseFn, fast, fast_vjp, get_activation
from .linear import LinearFn, affine, affine_jvp, affine_vjp

# f(z) = z, f'(z) = 1: the last layer of an MLP without a final activation. Recognised by
# identity (``act is IDENTITY``), so f' is never materialised.
IDENTITY = Activation("identity", lambda z: z, lambda z, y: torch.ones_like(z if y is None else y), "output")


def activation_spec(activation: str | Activation | None, **options) -> Activation:
    """``None`` → the identity; a name → ``get_activation(name, **options)``; a spec as is."""
    if activation is None:
        return IDENTITY
    if isinstance(activation, Activation):
        return activation
    return get_activation(activation, **options)


def _act_forward(act: Activation, Z: torch.Tensor, quick: bool = False, owned: bool = False) -> torch.Tensor:
    """Y = f(Z), the math in float32 for float16/bfloat16 and rounded once (as torch's kernels).
    ``quick``: the fast path (torch's forward kernel); ``owned`` too: Z is this op's own buffer
    and nothing reads it after, so Y overwrites it where f has an in-place kernel."""
    if act is IDENTITY:
        return Z
    if quick and owned and act.fast_f_ is not None:
        return act.fast_f_(Z)                                      # Z ← f(Z), no second buffer
    if act.fast_f is not None and quick:
        return act.fast_f(Z)                                       # torch's forward kernel, as the composition's
    return act.f(opmath(Z)).to(Z.dtype)


def _act_grad(act: Activation, G: torch.Tensor, Z: torch.Tensor | None, Y: torch.Tensor | None,
              inplace: bool, quick: bool = False) -> torch.Tensor:
    """Δ = G ⊙ f'(Z), with f'(Z) from the saved Z or Y (``act.saves``). ``inplace``: G is a
    buffer this op owns and nothing records the backward, so Δ overwrites it. ``quick``: the
    fast path may run (``activations.fast`` of the stack's tensors, asked once per pass)."""
    if act is IDENTITY:
        return G                                                   # f'(Z) = 1
    saved = Y if Z is None else Z
    if (act.fast_df is not None or act.kernel is not None) and quick and G.dtype == saved.dtype:
        D = fast_vjp(act, G, Z, Y, out=G if inplace else None)     # G ⊙ f'(Z), fewer passes (into G if ours)
        if D is not None:
            return D
    if act.select is not None:
        return act.select(G, Z, Y)                                 # torch selects G (relu): inf/nan G kept
    if inplace and G.dtype not in _LOW:                            # G is its own opmath dtype
        # G ⊙ f'(Z) into G, a block of rows at a time: f'(Z)'s temporaries (y(1 − y) makes
        # two) then span one block, not the whole (N, D) (native's sigmoid_backward makes none)
        N, D = G.shape
        rows = max(1, _DF_BLOCK // max(D, 1))
        if rows >= N:                                              # one block: no slicing
            return G.mul_(act.df(Z, Y))                            # G ⊙ f'(Z)
        for s in range(0, N, rows):
            z = None if Z is None else Z[s : s + rows]
            y = None if Y is None else Y[s : s + rows]
            G[s : s + rows].mul_(act.df(z, y))                     # G ⊙ f'(Z)
        return G
    d = act.df(opmath(Z), opmath(Y))                               # f'(Z)
    return (opmath(G) * d).to(G.dtype)                             # G ⊙ f'(Z)


_DF_BLOCK = 1 << 16   # elements per block of the in-place Δ (256 KiB in float32)
_GX_BLOCK = 1 << 18   # elements per row block of ∂L/∂X written over Δ (1 MiB in float32)


def _affine_vjp_over(D: torch.Tensor, X: torch.Tensor, W: torch.Tensor, needs):
    """``affine_vjp`` with ∂L/∂X = Δ W (N, D_in) written over Δ's own buffer (N, D_out), D_in ≤ D_out,
    a block of rows at a time: ∂L/∂W = Δᵀ X and ∂L/∂b first (they read all of Δ), then each row
    block r of Δ W goes to elements [r₀ D_in, r₁ D_in) of the buffer, which hold only rows of Δ
    before r₁ (r₁ D_in ≤ r₁ D_out), already read. Δ is a buffer this op owns and nothing records
    the backward; the layer's backward then allocates no (N, D_in) buffer (native's does)."""
    _, gW, gb = affine_vjp(D, X, W, (False, needs[1], needs[2]))   # Δᵀ X, 1ᵀ Δ
    N, D_out = D.shape
    D_in = W.shape[1]
    gX = D.view(-1)[: N * D_in].view(N, D_in)                         # (N, D_in) over Δ's first N·D_in elements
    rows = max(1, _GX_BLOCK // max(D_out, 1))
    for s in range(0, N, rows):
        e = min(s + rows, N)
        gX[s:e].copy_(D[s:e] @ W)                                     # Δ W, rows s…e
    return gX, gW, gb
_LOW = (torch.float16, torch.bfloat16)



# ------------------------------------------------------------------------------------------
# The whole network: linear_act (one layer) and mlp (L layers)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackSpec:
    """The non-tensor options of ``StackFn``: one activation per layer (STYLE.md §5)."""

    acts: tuple[Activation, ...]
    n_layers: int = field(init=False)
    # For layer l, the output index of Z_l (saved when f' needs the input), else None.
    # Outputs are X_1 … X_L, then the Z_l of those layers, in layer order.
    z_slots: tuple[int | None, ...] = field(init=False)

    def __post_init__(self):
        slots, k = [], len(self.acts)
        for act in self.acts:
            if act is not IDENTITY and act.saves == "input":
                slots.append(k)
                k += 1
            else:
                slots.append(None)
        object.__setattr__(self, "n_layers", len(self.acts))
        object.__setattr__(self, "z_slots", tuple(slots))


class StackFn(HandFunction):
    r"""The seed's network as one node: for l = 1 … L,

        Z_l = X_{l−1} W_lᵀ + b_l,    X_l = f_l(Z_l)

    — equals ``f_L(linear(… f_1(linear(x, W_1, b_1)) …, W_L, b_L))``; one layer is
    ``linear_act``, several are ``mlp``.

    Shapes: X_0 (N, D_0) (leading dims flattened into N), W_l (D_l, D_{l−1}), b_l (D_l,) or
    None → X_l (N, D_l).
    Arguments: ``(x, spec, W_1, b_1, …, W_L, b_L)`` (flattened, b_l may be None).
    Outputs: X_1 … X_L, then Z_l for each layer whose f' needs the input (``spec.z_slots``).
    The public functions return X_L; the other outputs are what the backward uses, returned
    (not kept on ctx) so that double backward sees them as functions of the inputs.
    Backward, G_l = ∂L/∂X_l (the incoming gradient of output X_l, zero if unused), the seed's
    recursion, top layer first:
        Δ_l      = f_l'(Z_l) ⊙ (G_l + Δ_{l+1} W_{l+1})   (N, D_l)    (Δ_{L+1} W_{L+1} := 0)
        ∂L/∂W_l  = Δ_lᵀ X_{l−1}                           (D_l, D_{l−1})
        ∂L/∂b_l  = 1ᵀ Δ_l                                 (D_l,)
        ∂L/∂X_0  = Δ_1 W_1                                (N, D_0)
    (plus ∂L/∂Z_l added to Δ_l where Z_l is an output).
    Forward mode, tangents Ẋ_0, Ẇ_l, ḃ_l, bottom layer first:
        Ż_l = Ẋ_{l−1} W_lᵀ + X_{l−1} Ẇ_lᵀ + ḃ_l,    Ẋ_l = f_l'(Z_l) ⊙ Ż_l
    Saved: X_0 … X_L, W_1 … W_L, and Z_l only where f_l' needs it (gelu, silu, …); for
    sigmoid, tanh, relu f' comes from X_l itself, which the next layer needs anyway — the same
    tensors native autograd keeps, no more. They are kept as detached aliases that the backward
    drops layer by layer, as native autograd frees each node's saved tensors (peak memory ≤
    native's), except where saved-tensor hooks, forward AD or torch.func are active
    (save_for_backward then); a backward with create_graph, or a second one after
    retain_graph, recomputes them from X_0 and the parameters. The backward's Δ buffers are reused in place
    (module docstring). In float16/bfloat16 the GEMMs run in the input dtype and each
    activation in float32, rounded once, as torch's kernels do.
    Derivation: docs/derivation.md#fused-operations
    """

    @staticmethod
    def forward(x, spec, *params):
        flat = x.dim() == 2                                        # already (N, D_0): no reshapes
        lead = x.shape[:-1]
        X = x if flat else x.reshape(lead.numel(), x.shape[-1])    # X_0 (N, D_0) (D_0 may be 0)
        xs, zs = [], []
        quick = fast(X)                                            # one dtype throughout: asked once
        for l, act in enumerate(spec.acts):
            W, b = params[2 * l], params[2 * l + 1]
            Z = affine(X, W, b)                                    # Z_l = X_{l−1} W_lᵀ + b_l  (N, D_l)
            X = _act_forward(act, Z, quick, spec.z_slots[l] is None)   # X_l = f_l(Z_l)        (N, D_l)
            xs.append(X if flat else X.reshape(*lead, W.shape[0]))   # (*, D_l)
            if spec.z_slots[l] is not None:
                zs.append(Z if flat else Z.reshape(*lead, W.shape[0]))   # (*, D_l)
        return (*xs, *zs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, spec, *params = inputs
        ctx.spec = spec
        ctx.x_shape = x.shape
        ctx.set_materialize_grads(False)   # unused outputs (X_1 … X_{L−1}) send None, not zeros
        weights, L = params[0::2], spec.n_layers
        ctx.out_shapes = [o.shape for o in output[:L]]
        # Backward keeps only what its equations read: X_0 if ∂L/∂W_1 is wanted, W_l if
        # anything below layer l needs a gradient, X_L only if f_L' is read from it.
        needs = ctx.needs_input_grad
        ctx.below = below = [needs[0] or any(needs[2 : 2 + 2 * l]) for l in range(L)]
        last = spec.acts[-1]
        keep_top = last is not IDENTITY and last.saves == "output"
        kept = [*output[: L - 1], output[L - 1] if keep_top else None, *output[L:]]
        # Forward mode reads all of them; saved only when a jvp can be asked for (a dual level
        # or a torch.func transform is active), so that plain training does not hold them.
        forward_mode = forward_ad_active() or functorch_transforms_active()
        if forward_mode:
            ctx.save_for_forward(x, *weights, *output)
        ctx.stash, ctx.stashed = None, False
        if forward_mode or saved_tensors_hooks_active() or torch.is_inference_mode_enabled():
            # Through save_for_backward, which the hooks (save_on_cpu, checkpointing) see (and
            # which takes inference tensors, whose version is not tracked); the node then holds
            # every activation until its backward ends.
            ctx.save_for_backward(x if needs[2] else None,
                                  *[w if below[l] else None for l, w in enumerate(weights)], *kept)
            return
        # Otherwise the activations are kept as detached aliases the fast backward drops layer by
        # layer (as native autograd frees each node's saved tensors), so the backward's peak holds
        # no activation above the layer it is at; the version counters they share with the outputs
        # still catch an in-place change. Saved properly: the inputs, from which a backward with
        # create_graph (or a second one, retain_graph) recomputes the activations.
        ctx.save_for_backward(x, *params)
        ctx.stashed = True
        ctx.stash = [None if t is None else (t.detach(), t._version) for t in kept]

    @staticmethod
    def _unpack(ctx):
        """X_0 … X_L (N, D_l), W_1 … W_L, Z_1 … Z_L (None where not saved), as saved by
        save_for_backward (or save_for_forward, in jvp)."""
        L, saved = ctx.spec.n_layers, ctx.saved_tensors
        x, weights, outs = saved[0], saved[1 : L + 1], saved[L + 1 :]
        N = ctx.x_shape[:-1].numel()
        if len(ctx.x_shape) == 2:                                  # already (N, D_l)
            return [x, *outs[:L]], weights, [None if k is None else outs[k] for k in ctx.spec.z_slots]
        X = [None if t is None else t.reshape(N, s[-1]) for t, s in zip((x, *outs[:L]), (ctx.x_shape, *ctx.out_shapes))]
        Z = [None if k is None else outs[k].reshape(N, outs[k].shape[-1]) for k in ctx.spec.z_slots]
        return X, weights, Z

    @staticmethod
    def _unpack_stash(ctx, stash):
        """X_0 … X_L (N, D_l), W_1 … W_L, Z_1 … Z_L from the stash (X_0 and W from the saved inputs)."""
        L, N = ctx.spec.n_layers, ctx.x_shape[:-1].numel()
        x, *params = ctx.saved_tensors
        flat = len(ctx.x_shape) == 2                               # already (N, D_l): no reshapes
        outs = []
        for item in stash:
            if item is None:
                outs.append(None)
                continue
            t, version = item
            if t._version != version:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: an output of StackFn of shape {list(t.shape)} is at version {t._version}; "
                    f"expected version {version} instead.")
            outs.append(t if flat else t.reshape(N, t.shape[-1]))  # (N, D_l)
        X = [x if flat else x.reshape(N, ctx.x_shape[-1]), *outs[:L]]
        Z = [None if k is None else outs[k] for k in ctx.spec.z_slots]
        return X, params[0::2], Z

    @staticmethod
    def _recompute(ctx):
        """X_0 … X_L, W, Z from the saved inputs, the forward run again: through LinearFn and
        ElementwiseFn where grad mode is on (create_graph), so the double backward differentiates
        the activations too; as plain values otherwise (a second backward after retain_graph)."""
        spec, N = ctx.spec, ctx.x_shape[:-1].numel()
        x, *params = ctx.saved_tensors
        X = [x.reshape(N, ctx.x_shape[-1])]
        Z = []
        recorded = torch.is_grad_enabled()
        for l, act in enumerate(spec.acts):
            W, b = params[2 * l], params[2 * l + 1]
            z = LinearFn.call(X[-1], W, b) if recorded else affine(X[-1], W, b)   # Z_l
            Z.append(z if spec.z_slots[l] is not None else None)
            X.append(z if act is IDENTITY else ElementwiseFn.call(z, act) if recorded else _act_forward(act, z, fast(z)))
        return X, params[0::2], Z

    @staticmethod
    def backward(ctx, *grads):
        spec, L = ctx.spec, ctx.spec.n_layers
        inplace = not torch.is_grad_enabled()   # fast path: nothing records this backward
        stash, ctx.stash = ctx.stash, None if inplace else ctx.stash   # the fast path consumes it
        if stash is not None and inplace:
            X, weights, Z = StackFn._unpack_stash(ctx, stash)
        elif ctx.stashed:                                          # the inputs only: recompute
            X, weights, Z = StackFn._recompute(ctx)
        else:
            X, weights, Z = StackFn._unpack(ctx)
        stash = None                                               # X, Z hold the only references now
        N = ctx.x_shape[:-1].numel()
        needs = ctx.needs_input_grad                               # (x, spec, W_1, b_1, …)
        upstream = ctx.below   # [l]: does X_0 or a parameter of a layer below l need a gradient?
        result: list[torch.Tensor | None] = [None] * (2 + 2 * L)
        g0 = [g for g in grads if g is not None]                  # (a list: Dynamo 2.4 has no next(it, default))
        quick = len(g0) > 0 and fast(g0[0], grad=g0[0])            # the fast path, asked once (one dtype)
        g0 = None
        G, owned = None, False                                     # Δ_{l+1} W_{l+1}, ours to overwrite?
        for l in reversed(range(L)):
            g_out = grads[l]                                       # ∂L/∂X_l from outside
            if g_out is not None and g_out.dim() != 2:
                g_out = g_out.reshape(N, g_out.shape[-1])                       # (N, D_l)
            if g_out is not None:
                G, owned = (g_out, False) if G is None else (G + g_out, True)
            Y, z_l, X[l + 1], Z[l] = X[l + 1], Z[l], None, None   # the last use of X_l, Z_l: drop them after
            D = None if G is None else _act_grad(spec.acts[l], G, z_l, Y, inplace and owned, quick)   # Δ_l = f'(Z_l) ⊙ G_l
            d_owned = D is not None and (owned or D is not G)      # Δ_l in a buffer of ours?
            G = Y = z_l = None
            k = spec.z_slots[l]
            if k is not None and grads[k] is not None:
                g_z = grads[k].reshape(N, grads[k].shape[-1])                      # ∂L/∂Z_l from outside
                D, d_owned = (g_z, False) if D is None else (D + g_z, True)        # Δ_l += ∂L/∂Z_l
            if D is None:                                          # nothing flows into this layer
                G, owned = None, False
                continue
            # the affine rule: Δ_l W_l (N, D_{l−1}), ∂L/∂W_l = Δ_lᵀ X_{l−1}, ∂L/∂b_l = 1ᵀ Δ_l
            W, wants = weights[l], (upstream[l], needs[2 + 2 * l], needs[3 + 2 * l])
            if inplace and quick and d_owned and l > 0 and upstream[l] and W.shape[1] <= W.shape[0] \
                    and D.numel() > _GX_BLOCK and D.is_contiguous() and D.dtype == W.dtype:   # (small: no memory to save)
                G, result[2 + 2 * l], result[3 + 2 * l] = _affine_vjp_over(D, X[l], W, wants)
            else:
                G, result[2 + 2 * l], result[3 + 2 * l] = affine_vjp(D, X[l], W, wants)
            owned = G is not None                                  # Δ_l W_l is a buffer of ours
            D = None                                               # Δ_l is done with: free it now
        if needs[0] and G is not None:
            result[0] = G.reshape(ctx.x_shape)                     # ∂L/∂X_0 = Δ_1 W_1
        return tuple(result)

    @staticmethod
    def jvp(ctx, dx, _spec, *dparams):
        spec, L = ctx.spec, ctx.spec.n_layers
        X, weights, Z = StackFn._unpack(ctx)
        N = X[0].shape[0]
        dX = None if dx is None else dx.reshape(N, dx.shape[-1])            # Ẋ_0 (N, D_0)
        dxs, dzs = [], []
        for l, act in enumerate(spec.acts):
            dW, db = dparams[2 * l], dparams[2 * l + 1]
            dZ = affine_jvp(X[l], weights[l], dX, dW, db)          # Ż_l = Ẋ_{l−1} W_lᵀ + X_{l−1} Ẇ_lᵀ + ḃ_l
            dX = _act_grad(act, dZ, Z[l], X[l + 1], False)         # Ẋ_l = f_l'(Z_l) ⊙ Ż_l
            shape = ctx.out_shapes[l]                              # (*, D_l)
            dxs.append(dX.reshape(shape))
            if spec.z_slots[l] is not None:
                dzs.append(dZ.reshape(shape))
        return (*dxs, *dzs)
