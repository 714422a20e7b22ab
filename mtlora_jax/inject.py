"""Injecting MTLoRA adapters into a Flax parameter tree.

`init(params, cfg, key)` returns the same tree with every target leaf (a "/"-joined path that
`re.fullmatch`es one of `cfg.targets`) replaced by an `Adapted` node holding the frozen weight and
fresh factors: A, C, D ~ U(±1/sqrt(fan_in)) as torch's ``kaiming_uniform_(a=sqrt(5))`` (fan_in = d_in for
A, rank for C and D) and B = 0, so dW = (alpha/rank) · B · T · A is exactly zero at init (arXiv
2403.07440; see `structures` for T).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtlora_jax import paths, structures
from mtlora_jax.adapted import Adapted, is_adapted
from mtlora_jax.quantized import is_quantized

A_INITS = ("kaiming_uniform", "gaussian")
B_INITS = ("zeros", "kaiming_uniform", "gaussian")


def _pairs(value, what: str) -> tuple:
    """A {regex: value} mapping (or pairs) as a hashable tuple of pairs, regexes validated."""
    items = tuple(value.items()) if isinstance(value, Mapping) else tuple(tuple(p) for p in value)
    paths.compile_patterns([k for k, _ in items], what)
    return items


@dataclasses.dataclass(frozen=True)
class MTLoRAConfig:
    """What to adapt and how.

    Attributes:
      rank: r, the adapter rank.
      alpha: scale = alpha / rank.
      structure: "lora" | "shim" | "icfm" | "ctcm" | "dtsm" (see `structures.STRUCTURES`).
      targets: regexes full-matched against "/"-joined parameter paths, e.g. r".*/(query|value)/kernel".
      dropout: adapter input dropout rate (active only when `mt.apply(fn, rng=...)` gets an rng).
      rank_pattern: {regex: rank} overrides per target (first match wins), like PEFT's rank_pattern.
      alpha_pattern: {regex: alpha} overrides per target.
      in_ndim: {regex: n}: the leading n axes of w (after stack axes) form d_in. Default 1 for 2-D
        weights; weights with more axes (DenseGeneral, conv) must be listed.
      stack_ndim: {regex: n}: leading stacked-layer axes (nn.scan), shared by w and its factors.
      fused: {regex: (slices, enable)}: fused projections, e.g. {r".*/c_attn/kernel": (3, (True, False, True))}.
      dtype: adapter dtype (fp32 adapters over a bf16 base work).
      a_init: "kaiming_uniform" (reference) or "gaussian" (N(0, 1/rank), PEFT's gaussian).
      b_init: "zeros" (reference), "kaiming_uniform" or "gaussian" (nonzero dW at init).
      c_init: "kaiming_uniform" (reference), "identity", "near_identity" or "zeros" (shim/dtsm with nonzero B).
    """

    rank: int = 8
    alpha: float = 16.0
    structure: str = "shim"
    targets: tuple[str, ...] = ()
    dropout: float = 0.0
    rank_pattern: tuple = ()
    alpha_pattern: tuple = ()
    in_ndim: tuple = ()
    stack_ndim: tuple = ()
    fused: tuple = ()
    dtype: object = jnp.float32
    a_init: str = "kaiming_uniform"
    b_init: str = "zeros"
    c_init: str = "kaiming_uniform"

    def __post_init__(self):
        structures.get_structure(self.structure)
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("targets", tuple(self.targets) if not isinstance(self.targets, str) else (self.targets,))
        if not self.targets:
            raise ValueError("MTLoRAConfig.targets is empty: give regexes such as r'.*/(query|value)/kernel'")
        paths.compile_patterns(self.targets, "MTLoRAConfig.targets")
        for name in ("rank_pattern", "alpha_pattern", "in_ndim", "stack_ndim", "fused"):
            set_(name, _pairs(getattr(self, name), f"MTLoRAConfig.{name}"))
        for what, value in [("rank", self.rank)] + [(f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern]:
            if not isinstance(value, int | np.integer) or value <= 0:
                raise ValueError(f"MTLoRAConfig.{what} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MTLoRAConfig.dropout must be in [0, 1), got {self.dropout}")
        set_("dtype", jnp.dtype(self.dtype))
        for name, valid in (("a_init", A_INITS), ("b_init", B_INITS), ("c_init", structures.C_INITS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"MTLoRAConfig.{name}={getattr(self, name)!r}; valid: {', '.join(valid)}")
        if self.c_init == "zeros" and (self.b_init == "zeros" or self.structure in ("icfm", "ctcm")):
            raise ValueError(
                f"MTLoRAConfig: c_init='zeros' with b_init={self.b_init!r} and structure={self.structure!r} "
                "makes every adapter gradient exactly zero forever; use c_init='kaiming_uniform'"
            )


class _Layout(NamedTuple):
    """How one target weight splits, validated: everything static about its adapter."""

    stack_shape: tuple[int, ...]
    in_ndim: int
    d_in: int
    d_slice: int
    slices: int
    enable: tuple[bool, ...]
    rank: int
    alpha: float


def _layout(path: str, w, cfg: MTLoRAConfig) -> _Layout:
    """Reads the stack/in/out split, fused slices, rank and alpha of one target; raises naming `path`."""
    if not hasattr(w, "shape") or is_adapted(w):
        raise ValueError(f"target {path!r} is {'already adapted' if is_adapted(w) else type(w).__name__}")
    stack = paths.first_match(cfg.stack_ndim, path, 0)
    core_ndim = w.ndim - stack
    if core_ndim < 2:
        raise ValueError(
            f"target {path!r} has shape {tuple(w.shape)}, not a matrix-like weight (a bias or a norm scale?); "
            "tighten MTLoRAConfig.targets"
        )
    in_ndim = paths.first_match(cfg.in_ndim, path, 1 if core_ndim == 2 else None)
    if in_ndim is None:
        raise ValueError(
            f"target {path!r} has shape {tuple(w.shape)}: say which leading axes form d_in with "
            f"MTLoRAConfig.in_ndim={{{path!r}: n}} (conv kernels [*spatial, in, out]: n = {core_ndim - 1})"
        )
    slices, enable = paths.first_match(cfg.fused, path, (1, (True,)))
    enable = tuple(bool(e) for e in enable)
    rank = int(paths.first_match(cfg.rank_pattern, path, cfg.rank))
    alpha = float(paths.first_match(cfg.alpha_pattern, path, cfg.alpha))
    d_in = math.prod(w.shape[stack : stack + in_ndim])
    d_out = math.prod(w.shape[stack + in_ndim :])
    if len(enable) != slices or slices < 1 or d_out % slices:
        raise ValueError(f"target {path!r}: fused={slices, enable} does not fit d_out={d_out}")
    d_slice = d_out // slices
    if not 0 < rank <= min(d_in, d_slice):
        raise ValueError(f"target {path!r}: rank {rank} must be in [1, min(d_in={d_in}, d_out={d_slice})]")
    return _Layout(tuple(w.shape[:stack]), in_ndim, d_in, d_slice, slices, enable, rank, alpha)


def _factors(cfg: MTLoRAConfig, lay: _Layout, key: jax.Array):
    """Fresh (a, b, c, d) for one layout: A [*s, kr, d_in], B [*s, k·d_slice, r], C, D [*s, kr, kr]."""
    ka, kb, kc = jax.random.split(key, 3)
    dt, rank, s = cfg.dtype, lay.rank, lay.stack_shape
    kr = sum(lay.enable) * rank
    if cfg.a_init == "kaiming_uniform":
        bound = 1.0 / math.sqrt(lay.d_in)
        a = jax.random.uniform(ka, s + (kr, lay.d_in), dt, -bound, bound)
    else:
        a = jax.random.normal(ka, s + (kr, lay.d_in), dt) / rank
    b_shape = s + (sum(lay.enable) * lay.d_slice, rank)
    if cfg.b_init == "zeros":
        b = jnp.zeros(b_shape, dt)
    elif cfg.b_init == "kaiming_uniform":
        b = jax.random.uniform(kb, b_shape, dt, -1 / math.sqrt(rank), 1 / math.sqrt(rank))
    else:
        b = jax.random.normal(kb, b_shape, dt) / rank
    c, d = structures.init_cd(cfg.structure, kc, s + (kr, kr), dt, cfg.c_init)
    return a, b, c, d


@functools.partial(jax.jit, static_argnums=(0, 1))
def _all_factors(cfg: MTLoRAConfig, layouts: tuple[_Layout, ...], key: jax.Array):
    """Every target's factors in one compiled call (op-by-op init compiles each random op separately)."""
    return [_factors(cfg, lay, k) for lay, k in zip(layouts, jax.random.split(key, len(layouts)), strict=True)]


def init(params, cfg: MTLoRAConfig, key: jax.Array):
    """Adds MTLoRA adapters to every target leaf.

    Args:
      params: a Flax parameter tree (the "params" collection), plain arrays.
      cfg: what to adapt.
      key: PRNG key; each target gets its own key split from it.

    Returns:
      The same tree structure with each target leaf an `Adapted` node; other leaves are the same objects.

    Raises:
      ValueError: a target regex matching nothing, a non-matrix target, a bad rank or fused split.
    """
    named = paths.named_leaves(params)
    all_paths = [p for p, _ in named]
    patterns = paths.compile_patterns(cfg.targets, "MTLoRAConfig.targets")
    paths.check_all_used(patterns, all_paths, "MTLoRAConfig.targets")
    targets = {p: leaf for p, leaf in named if paths.matches_any(patterns, p)}
    layouts = {p: _layout(p, leaf, cfg) for p, leaf in targets.items()}
    factors = dict(zip(layouts, _all_factors(cfg, tuple(layouts.values()), key), strict=True))

    def visit(keypath, leaf):
        path = paths.path_str(keypath)
        if path not in layouts:
            return leaf
        lay, (a, b, c, d) = layouts[path], factors[path]
        node = Adapted(
            w=leaf,
            a=a,
            b=b,
            c=c,
            d=d,
            structure=cfg.structure,
            scale=lay.alpha / lay.rank,
            in_ndim=lay.in_ndim,
            stack_ndim=len(lay.stack_shape),
            dropout=cfg.dropout,
            slices=lay.slices,
            enable=lay.enable,
        )
        return node.validate(path)

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=lambda x: is_adapted(x) or is_quantized(x))
