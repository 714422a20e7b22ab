"""Rotary position embeddings (RoPE, Su et al. 2021, arXiv 2104.09864) in Hugging Face's layout.

HF Llama rotates the two *halves* of each head, ``x·cos + rotate_half(x)·sin`` with
``rotate_half([x1, x2]) = [-x2, x1]`` and ``cos = cos(p·inv_freq)`` repeated over both halves.
(llama.cpp rotates interleaved pairs instead; the GGUF loader undoes its q/k row permutation so
that this one layout serves both sources.) Frequencies: ``inv_freq_i = base^(-2i/d)``, optionally
rescaled by the ``"linear"`` or ``"llama3"`` rules (Llama 3.1's low/high-frequency smoothing).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3")


def inv_frequencies(head_dim: int, base: float, scaling: tuple[tuple[str, float], ...] = ()) -> np.ndarray:
    """The inverse frequencies [head_dim // 2] (float32) for a RoPE config.

    Args:
      head_dim: rotary dimension d (even).
      base: ``rope_theta``.
      scaling: the config's ``rope_parameters`` minus ``rope_theta``, as sorted (key, value) pairs;
        empty or ``rope_type="default"`` means no scaling.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    params = dict(scaling)
    kind = params.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {kind!r} (config rope_parameters); valid: {ROPE_TYPES}")
    if kind == "linear":
        inv = inv / params["factor"]
    elif kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rotary_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables for integer positions.

    Args:
      positions: [b, t] int position ids.
      inv_freq: [d/2] from :func:`inv_frequencies`.

    Returns:
      (cos, sin), each [b, t, 1, d] float32 (the 1 broadcasts over heads).
    """
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, t, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [b, t, 1, d]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x: [b, t, h, d] by the tables [b, t, 1, d]; returns x's shape and dtype."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)
