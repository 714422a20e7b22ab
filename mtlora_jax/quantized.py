"""The `Quantized` pytree node of a quantized frozen base and its dequantization (layout: `mtlora_jax.quantize`)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

METHODS = ("int8", "nf4")
# The 16 NF4 levels of QLoRA (bitsandbytes' NF4 code book), in increasing order.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
SCALE_BLOCK = 256  # scales per absmax block under double quantization


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales", "scale_absmax", "scale_mean"],
    meta_fields=["matrix_shape", "dtype", "method", "block_size"],
)
@dataclasses.dataclass(frozen=True)
class Quantized:
    """A quantized matrix (or stack of matrices) of a frozen base (module docstring).

    Attributes:
      codes: [*stack, n_blocks, block_size] int8 (int8) or [*stack, n_blocks, block_size // 2] uint8 (nf4).
      scales: [*stack, n_blocks] float32 absmax per block, or int8 codes of them (double quantization).
      scale_absmax: [*stack, ceil(n_blocks / 256)] float32, or None (no double quantization).
      scale_mean: [*stack] float32, or None.
      matrix_shape: (d_in, d_out) of one matrix. dtype: the dtype dequantization gives (the original's).
      method: "int8" or "nf4". block_size: values per block.
    """

    codes: jax.Array
    scales: jax.Array
    scale_absmax: jax.Array | None
    scale_mean: jax.Array | None
    matrix_shape: tuple[int, int]
    dtype: str
    method: str
    block_size: int

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[:-2])

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the float array this stands for."""
        return self.stack_shape + tuple(self.matrix_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes and scales (what replaces the float matrix)."""
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))

    def dequantize(self) -> jax.Array:
        """The float array [*stack, d_in, d_out] in `dtype` (padding dropped)."""
        scales = _block_scales(self)
        if self.method == "int8":
            values = self.codes.astype(jnp.float32) * (scales / 127.0)[..., None]
        else:
            hi, lo = self.codes >> 4, self.codes & 0xF
            q = jnp.stack([hi, lo], axis=-1).reshape(self.codes.shape[:-1] + (self.block_size,))
            values = jnp.asarray(NF4_LEVELS, jnp.float32)[q] * scales[..., None]
        n = math.prod(self.matrix_shape)
        flat = values.reshape(self.stack_shape + (-1,))[..., :n]
        return flat.reshape(self.shape).astype(self.dtype)


def is_quantized(x) -> bool:
    """True for a `Quantized` node (use as `is_leaf` in tree maps)."""
    return isinstance(x, Quantized)


def _block_scales(q: Quantized) -> jax.Array:
    """[*stack, n_blocks] float32 absmax per block (undoing the double quantization)."""
    if q.scale_absmax is None:
        return q.scales.astype(jnp.float32)
    n = q.scales.shape[-1]
    per = jnp.repeat(q.scale_absmax, SCALE_BLOCK, axis=-1)[..., :n]
    return q.scales.astype(jnp.float32) * per / 127.0 + q.scale_mean[..., None]


def dequantize_value(x):
    """x.dequantize() for a `Quantized` node, else x unchanged."""
    return x.dequantize() if is_quantized(x) else x
