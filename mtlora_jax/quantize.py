"""A quantized frozen base (QLoRA-style): `quantize`, `dequantize` and the `Quantized` pytree node.

`quantize(tree, method, targets=..., block_size=64)` replaces each target matrix leaf by a `Quantized` node;
the adapters of `mt.init` sit on top of it, `mt.apply` dequantizes each weight where it is used inside the
traced step (one layer at a time under `nn.scan`), `mt.merge` and `dequantize` give plain arrays back.

Layout. A target is a matrix [d_in, d_out], or a stack of them [*stack, d_in, d_out] (nn.scan layers). Each
matrix is flattened row-major and cut into blocks of `block_size` values (the last one zero-padded; the padding
never shows: `dequantize` drops it); each block keeps its absmax `s` and codes:

  int8   q = round(127 · x / s), int8 in [-127, 127];  x ≈ q · s / 127
  nf4    q = the index of the nearest of the 16 NormalFloat-4 levels (Dettmers et al. 2023, QLoRA; the values
         bitsandbytes uses) to x / s, two 4-bit codes per uint8 (the first value in the high nibble);
         x ≈ NF4[q] · s

so `codes` is [*stack, n_blocks, block_size] int8 or [*stack, n_blocks, block_size / 2] uint8 and `scales`
[*stack, n_blocks] float32. With `double_quant=True` the scales are quantized in turn (QLoRA's double
quantization, here with int8 absmax codes): their mean over the matrix is subtracted, and each block of 256
scales keeps int8 codes and one float32 absmax (`scales` int8, `scale_absmax` [*stack, ceil(n_blocks / 256)],
`scale_mean` [*stack]); about 0.52 instead of 0.56 bytes per NF4 value.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mtlora_jax import paths
from mtlora_jax.adapted import is_adapted
from mtlora_jax.quantized import METHODS, NF4_LEVELS, SCALE_BLOCK, Quantized, dequantize_value, is_quantized


def _int8_absmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(int8 codes, absmax) of x [..., k] per last axis: q = round(127 x / absmax)."""
    absmax = jnp.max(jnp.abs(x), axis=-1)
    inv = jnp.where(absmax > 0, 127.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    return jnp.clip(jnp.round(x * inv[..., None]), -127, 127).astype(jnp.int8), absmax


@functools.partial(jax.jit, static_argnames=("method", "block_size", "double_quant"))
def quantize_array(w: jax.Array, method: str, block_size: int = 64, double_quant: bool = False) -> Quantized:
    """One matrix [d_in, d_out] or stack [*stack, d_in, d_out] -> `Quantized` (module docstring)."""
    stack, matrix = w.shape[:-2], w.shape[-2:]
    n = math.prod(matrix)
    n_blocks = -(-n // block_size)
    flat = w.astype(jnp.float32).reshape(stack + (n,))
    flat = jnp.pad(flat, [(0, 0)] * len(stack) + [(0, n_blocks * block_size - n)])
    blocks = flat.reshape(stack + (n_blocks, block_size))
    if method == "int8":
        codes, scales = _int8_absmax(blocks)
    else:
        scales = jnp.max(jnp.abs(blocks), axis=-1)
        unit = blocks / jnp.where(scales > 0, scales, 1.0)[..., None]
        levels = jnp.asarray(NF4_LEVELS, jnp.float32)
        q = jnp.argmin(jnp.abs(unit[..., None] - levels), axis=-1).astype(jnp.uint8)  # [..., block_size]
        q = q.reshape(q.shape[:-1] + (block_size // 2, 2))
        codes = (q[..., 0] << 4) | q[..., 1]
    absmax = mean = None
    if double_quant:
        mean = scales.mean(axis=-1)
        centred = scales - mean[..., None]
        n_sb = -(-n_blocks // SCALE_BLOCK)
        padded = jnp.pad(centred, [(0, 0)] * len(stack) + [(0, n_sb * SCALE_BLOCK - n_blocks)])
        scale_codes, absmax = _int8_absmax(padded.reshape(stack + (n_sb, SCALE_BLOCK)))
        scales = scale_codes.reshape(stack + (-1,))[..., :n_blocks]
    return Quantized(codes, scales, absmax, mean, tuple(matrix), jnp.dtype(w.dtype).name, method, block_size)


def check_method(method: str, block_size: int) -> None:
    """Raises ValueError for an unknown method or a block size it cannot use."""
    if method not in METHODS:
        raise ValueError(f"quantize: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"quantize: block_size={block_size!r}: expected a positive int")
    if method == "nf4" and block_size % 2:
        raise ValueError(f"quantize: block_size={block_size} does not divide into the pairs of 4-bit codes nf4 "
                         "packs per byte: expected an even block size")  # fmt: skip


def quantize(tree, method: str, *, targets=(r".*kernel",), block_size: int = 64, double_quant: bool = False):
    """The same tree with every target leaf replaced by a `Quantized` node.

    Args:
      tree: a param tree (plain arrays; quantize before `mt.init`, which then adapts the quantized leaves).
      method: "int8" or "nf4".
      targets: regexes full-matched against "/"-joined leaf paths; every match must be a float matrix
        [d_in, d_out] or a stack of them.
      block_size: values per absmax block (nf4: even).
      double_quant: quantize the scales too (module docstring).

    Raises:
      ValueError: an unknown method, a bad block size, a pattern matching nothing, or a target that is not a
        floating-point matrix (naming its path).
    """
    check_method(method, block_size)
    patterns = paths.compile_patterns(tuple(targets), "targets")
    names = [p for p, _ in paths.named_leaves(tree)]
    paths.check_all_used(patterns, names, "targets")

    def visit(keypath, leaf):
        path = paths.path_str(keypath)
        if not paths.matches_any(patterns, path) or is_quantized(leaf):
            return leaf
        if is_adapted(leaf):
            raise ValueError(f"quantize: {path} is already adapted; quantize the base first, then mt.init")
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if shape is None or len(shape) < 2 or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"quantize: {path} is not a floating-point matrix (shape {shape}, dtype {dtype}); "
                             "narrow `targets` to the weight matrices")  # fmt: skip
        return quantize_array(jnp.asarray(leaf), method, block_size, double_quant)

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=lambda x: is_quantized(x) or is_adapted(x))


def dequantize(tree):
    """The same tree with every `Quantized` node (also inside `mt.Adapted` leaves) as a plain float array."""
    return jax.tree.map(dequantize_value, tree, is_leaf=is_quantized)
