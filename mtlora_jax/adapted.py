"""The adapted-weight pytree node and the adapter math in both orientations.

Orientation. A, B, C, D follow the paper and the PyTorch reference: the adapted matrix is the torch
weight [d_out, d_in], and

    dW_torch = scale · B_full · T · A,      scale = alpha / rank,

with A [R, d_in], T [R, R], B_full [d_out, R]. A Flax weight `w` stores the transpose: its leading
`in_ndim` axes (after `stack_ndim` stacked-layer axes) flatten row-major to d_in and the rest to d_out,
so `w.reshape(d_in, d_out)` is W_torchᵀ and the update in w's own layout is `(dW_torch)ᵀ` reshaped to
w.shape. `delta` is the one place that converts between the two layouts.

Fused projections (GPT-2's c_attn, q,k,v in one [d, 3d] kernel) follow the reference `MergedLinear`:
the output splits into `slices` equal parts, `enable` picks the adapted ones (k of them), A is
[k·rank, d_in], one joint T is [k·rank, k·rank] and B is block diagonal; `b` stores only its k blocks,
stacked as [k·d_slice, rank]. Unfused leaves have slices = 1: b is [d_out, rank] and R = rank.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from mtlora_jax import structures


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["w", "a", "b", "c", "d"],
    meta_fields=["structure", "scale", "in_ndim", "stack_ndim", "dropout", "slices", "enable"],
)
@dataclasses.dataclass(frozen=True)
class Adapted:
    """A frozen weight with its MTLoRA factors (a registered pytree node).

    Attributes:
      w: [*stack, *in_shape, *out_shape] the frozen base weight, unchanged.
      a: [*stack, R, d_in] with R = rank · (number of enabled slices).
      b: [*stack, d_out, rank], or [*stack, k·d_slice, rank] for a fused leaf with k enabled slices.
      c: [*stack, R, R] or None (lora).
      d: [*stack, R, R] or None (lora, shim, icfm).
      structure: a key of `structures.STRUCTURES`.
      scale: alpha / rank.
      in_ndim: how many leading axes of w (after the stack axes) form d_in.
      stack_ndim: leading stacked-layer axes (nn.scan) shared by w, a, b, c, d.
      dropout: adapter input dropout rate (applied only when `mt.apply` is given an rng).
      slices: number of equal output slices of a fused projection (1 = not fused).
      enable: which slices are adapted (length `slices`).
    """

    w: jax.Array
    a: jax.Array
    b: jax.Array
    c: jax.Array | None = None
    d: jax.Array | None = None
    structure: str = "lora"
    scale: float = 1.0
    in_ndim: int = 1
    stack_ndim: int = 0
    dropout: float = 0.0
    slices: int = 1
    enable: tuple[bool, ...] = (True,)

    # --- shapes -------------------------------------------------------------------------------------
    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape[: self.stack_ndim])

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape[self.stack_ndim : self.stack_ndim + self.in_ndim])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape[self.stack_ndim + self.in_ndim :])

    @property
    def d_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def d_out(self) -> int:
        return math.prod(self.out_shape)

    @property
    def rank(self) -> int:
        return self.b.shape[-1]

    @property
    def d_slice(self) -> int:
        """Output rows per adapted slice (d_out for an unfused leaf), read from b so views of w work."""
        return self.b.shape[-2] // sum(self.enable)

    @property
    def total_rank(self) -> int:
        return self.a.shape[-2]

    def validate(self, path: str = "") -> Adapted:
        """Checks every field's shape against w's; raises ValueError naming `path` and the field."""
        where = f"{path}: " if path else ""
        s = self.stack_shape
        k = sum(self.enable)
        if len(self.enable) != self.slices or k == 0:
            raise ValueError(f"{where}enable={self.enable} must have {self.slices} entries, one True")
        if self.slices > 1 and self.d_out % self.slices:
            raise ValueError(f"{where}d_out={self.d_out} does not split into {self.slices} slices")
        if self.in_ndim < 1 or self.stack_ndim + self.in_ndim >= self.w.ndim:
            raise ValueError(
                f"{where}w {self.w.shape} cannot split into {self.stack_ndim} stack, {self.in_ndim} in "
                "and at least one out axis"
            )
        rank = self.rank
        want = {
            "a": s + (k * rank, self.d_in),
            "b": s + (k * self.d_out // self.slices, rank),
        }
        n = structures.get_structure(self.structure).num_mats
        want.update({"c": s + (k * rank,) * 2 if n >= 1 else None, "d": s + (k * rank,) * 2 if n == 2 else None})
        for name, shape in want.items():
            got = getattr(self, name)
            got_shape = None if got is None else tuple(got.shape)
            if got_shape != shape:
                raise ValueError(f"{where}{name} has shape {got_shape}, expected {shape} for w {self.w.shape}")
        return self

    # --- the math on one (unstacked) adapter ----------------------------------------------------------
    def t(self) -> jax.Array | None:
        """T [*stack, R, R] (None for lora, meaning the identity)."""
        return structures.transform(self.structure, self.c, self.d)

    def b_full(self) -> jax.Array:
        """B_full [*stack, d_out, R]: b's blocks on the diagonal, zero rows for disabled slices."""
        if self.slices == 1:
            return self.b
        s, k, r, d_slice = self.b.shape[:-2], sum(self.enable), self.rank, self.d_slice
        blocks = self.b.reshape(s + (k, d_slice, r))  # [*stack, k, d_slice, rank]
        rows, j = [], 0
        for on in self.enable:
            row = jnp.zeros(s + (d_slice, k * r), self.b.dtype)
            if on:
                row = row.at[..., j * r : (j + 1) * r].set(blocks[..., j, :, :])
                j += 1
            rows.append(row)
        return jnp.concatenate(rows, axis=-2)

    def matrix(self) -> jax.Array:
        """scale · B_full · T · A, the update in torch orientation: [*stack, d_out, d_in]."""
        bt = self.b_full()
        t = self.t()
        if t is not None:
            bt = bt @ t  # [*stack, d_out, R]
        return self.scale * (bt @ self.a)

    def delta(self) -> jax.Array:
        """dW in w's own layout and shape: (scale · B_full T A)ᵀ reshaped row-major to w.shape."""
        return jnp.swapaxes(self.matrix(), -1, -2).reshape(self.w.shape)

    def out_proj(self, v: jax.Array) -> jax.Array:
        """v B_fullᵀ without forming B_full: [n, R] -> [n, d_out] (unstacked)."""
        if self.slices == 1:
            return v @ _rank_major(self.b)
        k, r, d_slice = sum(self.enable), self.rank, self.d_slice
        bt = _rank_major(self.b.reshape(k, d_slice, r))  # [k, rank, d_slice]
        z = jnp.einsum("nkr,krd->nkd", v.reshape(-1, k, r), bt)
        parts, j = [], 0
        for on in self.enable:
            parts.append(z[:, j] if on else jnp.zeros((v.shape[0], d_slice), z.dtype))
            j += on
        return jnp.concatenate(parts, axis=-1)

    def out_proj_t(self, y: jax.Array) -> jax.Array:
        """y B_full: [n, d_out] -> [n, R] (unstacked; the transposed use, e.g. a tied LM head)."""
        if self.slices == 1:
            return y @ jnp.swapaxes(_rank_major(self.b), -1, -2)
        k, r, d_slice = sum(self.enable), self.rank, self.d_slice
        y = y.reshape(-1, self.slices, d_slice)[:, jnp.array([i for i, on in enumerate(self.enable) if on])]
        bt = _rank_major(self.b.reshape(k, d_slice, r))  # [k, rank, d_slice]
        return jnp.einsum("nkd,krd->nkr", y, bt).reshape(-1, k * r)

    def mix_out(self, u: jax.Array) -> jax.Array:
        """scale · u Tᵀ B_fullᵀ: [n, R] -> [n, d_out] (unstacked), in u's dtype.

        The scale multiplies the small side (Tᵀ [R, R], or u [n, R] for LoRA), never the [n, d_out] output: a
        full-size multiply would cost a pass over the output forward and over its gradient backward, and would
        stand between the matmul and the add of the base output that XLA fuses into it."""
        t = self.t()
        if t is not None:
            u = u @ (self.scale * t.T).astype(u.dtype)
        else:
            u = u * jnp.asarray(self.scale, u.dtype)
        return self.cast(u.dtype).out_proj(u)

    def project(self, x: jax.Array) -> jax.Array:
        """The adapter path x · dWᵀ_torch = scale · x Aᵀ Tᵀ B_fullᵀ: [n, d_in] -> [n, d_out] (unstacked)."""
        return self.mix_out(x @ self.a.T.astype(x.dtype))  # x Aᵀ: [n, R]

    def project_t(self, y: jax.Array) -> jax.Array:
        """The transposed use y · dW_torch = scale · y B_full T A: [n, d_out] -> [n, d_in] (unstacked)."""
        u = self.cast(y.dtype).out_proj_t(y)  # [n, R]
        t = self.t()
        if t is not None:
            u = u @ (self.scale * t).astype(y.dtype)  # the scale on the small side, as in mix_out
        else:
            u = u * jnp.asarray(self.scale, y.dtype)
        return u @ self.a.astype(y.dtype)

    def cast(self, dtype) -> Adapted:
        """The factors (not w) cast to `dtype`, e.g. fp32 master adapters to a bf16 compute dtype."""
        conv = lambda m: None if m is None else m.astype(dtype)
        return dataclasses.replace(self, a=conv(self.a), b=conv(self.b), c=conv(self.c), d=conv(self.d))


def _rank_major(b: jax.Array) -> jax.Array:
    """bᵀ [..., rank, d]: b [..., d, rank] with its last two axes swapped, behind an optimization barrier.

    The barrier keeps XLA from folding this small transpose into the gradient of b, so that gradient is
    computed as the dot [rank, n]·[n, d] -> [rank, d] and only its small result is transposed. Folded, the dot
    writes [d, rank] directly, which XLA on CPU runs 2.3-3.2x slower (bench/adapter_dots.py, docs/BENCHMARKS.md)."""
    return jax.lax.optimization_barrier(jnp.swapaxes(b, -1, -2))


def is_adapted(x) -> bool:
    """True for an `Adapted` node (use as `is_leaf` in tree maps)."""
    return isinstance(x, Adapted)


def delta(leaf: Adapted) -> jax.Array:
    """dW of one adapted leaf in w's layout and shape (see `Adapted.delta`)."""
    if not isinstance(leaf, Adapted):
        raise TypeError(f"delta expects an mt.Adapted leaf, got {type(leaf).__name__}")
    return leaf.delta()
