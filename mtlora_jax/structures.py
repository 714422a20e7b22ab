"""The MTLoRA transformation matrices T, one registry for all structures.

MTLoRA (Liang, Wang, Zeng, arXiv 2403.07440) adapts a frozen weight with dW = (alpha / rank) · B · T · A,
where A is [rank, d_in], B is [d_out, rank] and T is a [rank, rank] transformation built from one or two
trainable matrices C and D:

    lora  T = I        (plain LoRA: no C, no D)
    shim  T = C        (spatial holistic information)
    icfm  T = C · Cᵀ   (symmetric positive semi-definite; ICFM)
    ctcm  T = C · D    (composition of two transforms)
    dtsm  T = C + D    (sum of two transforms)

`STRUCTURES` maps each name to a `Structure` (how many matrices it has and how T is formed). The
reference initialises C and D like torch's ``kaiming_uniform_(a=sqrt(5))`` on an [r, r] matrix, i.e.
U(-1/sqrt(r), +1/sqrt(r)); `init_cd` does that and offers identity-based variants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Structure:
    """One T structure: `num_mats` trainable [rank, rank] matrices and `fn(c, d) -> t`."""

    name: str
    num_mats: int
    fn: Callable[[jax.Array | None, jax.Array | None], jax.Array | None]


STRUCTURES: dict[str, Structure] = {
    "lora": Structure("lora", 0, lambda c, d: None),
    "shim": Structure("shim", 1, lambda c, d: c),
    "icfm": Structure("icfm", 1, lambda c, d: c @ c.T),
    "ctcm": Structure("ctcm", 2, lambda c, d: c @ d),
    "dtsm": Structure("dtsm", 2, lambda c, d: c + d),
}

C_INITS = ("kaiming_uniform", "identity", "near_identity", "zeros")


def get_structure(name: str) -> Structure:
    """Looks up a structure by name; raises ValueError listing the valid names."""
    if name not in STRUCTURES:
        raise ValueError(f"unknown MTLoRA structure {name!r}; valid: {', '.join(STRUCTURES)}")
    return STRUCTURES[name]


def transform(structure: str, c: jax.Array | None, d: jax.Array | None) -> jax.Array | None:
    """Builds T from C and D.

    Args:
      structure: a key of `STRUCTURES`.
      c: [..., rank, rank] or None (lora).
      d: [..., rank, rank] or None (lora, shim, icfm).

    Returns:
      t: [..., rank, rank], or None for "lora" (T = I, skipped in the compute).
    """
    s = get_structure(structure)
    for name, m in (("c", c), ("d", d))[: s.num_mats]:
        if m is None or m.ndim < 2 or m.shape[-1] != m.shape[-2]:
            raise ValueError(f"structure {structure!r} needs square {name}, got {None if m is None else m.shape}")
    if s.num_mats == 2 and c.shape != d.shape:
        raise ValueError(f"structure {structure!r}: c {c.shape} and d {d.shape} must have the same shape")
    if c is not None and c.ndim > 2:  # stacked layers: apply per leading index
        return jnp.vectorize(lambda ci, di: s.fn(ci, di), signature="(r,r),(r,r)->(r,r)")(c, c if d is None else d)
    return s.fn(c, d)


def init_cd(
    structure: str, key: jax.Array, shape: tuple[int, ...], dtype, c_init: str = "kaiming_uniform"
) -> tuple[jax.Array | None, jax.Array | None]:
    """Initialises C and D for one adapter.

    Args:
      structure: a key of `STRUCTURES`.
      key: PRNG key (split here, never reused).
      shape: (*stack, rank, rank) (a leading stack axis for scanned layers).
      dtype: the adapter dtype.
      c_init: "kaiming_uniform" (the reference: U(±1/sqrt(rank))), "identity" (T = I at init: C = I, and
        D = I for ctcm, D = 0 for dtsm), "near_identity" (the identity init plus U(±1/sqrt(rank)) / 10
        noise on every matrix) or "zeros" (shim and dtsm only, and only with a nonzero B: zero C and D
        give ICFM and CTCM exactly zero gradients forever).

    Returns:
      (c, d), each [*stack, rank, rank] or None where the structure has no such matrix.
    """
    s = get_structure(structure)
    if c_init not in C_INITS:
        raise ValueError(f"unknown c_init {c_init!r}; valid: {', '.join(C_INITS)}")
    if c_init == "zeros" and structure in ("icfm", "ctcm"):
        raise ValueError(
            f"c_init='zeros' with structure {structure!r} gives T exactly zero gradients forever; "
            "use 'kaiming_uniform', 'identity' or 'near_identity'"
        )
    if s.num_mats == 0:
        return None, None
    rank = shape[-1]
    bound = 1.0 / jnp.sqrt(rank)
    eye = jnp.broadcast_to(jnp.eye(rank, dtype=dtype), shape)
    kc, kd = jax.random.split(key)
    uniform = lambda k: jax.random.uniform(k, shape, dtype, -bound, bound)
    if c_init == "kaiming_uniform":
        mats = [uniform(kc), uniform(kd)]
    elif c_init == "zeros":
        mats = [jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)]
    else:
        # identity: T = I at init (dtsm splits it as I + 0).
        mats = [eye, eye if structure == "ctcm" else jnp.zeros(shape, dtype)]
        if c_init == "near_identity":
            mats = [mats[0] + uniform(kc) / 10, mats[1] + uniform(kd) / 10]
    c = mats[0]
    d = mats[1] if s.num_mats == 2 else None
    return c, d
