"""Building blocks shared by the Flax models: dense layers, norms, activations, attention, RoPE.

Every adaptable weight in these models is a plain 2-D ``nn.Dense`` kernel ``[d_in, d_out]`` that
reaches a single ``dot_general`` unchanged: heads are split by reshaping the *activations* after the
matmul, never the kernel. That is what lets ``mtlora_jax.apply`` swap ``x @ W`` for the factored
``x @ W + scale * x Aᵀ Tᵀ Bᵀ`` without materialising dW.

Numerics follow Hugging Face: parameters are kept in ``param_dtype`` (float32), the forward pass runs
in ``dtype`` (e.g. bfloat16), and attention softmax and RMSNorm statistics are computed in float32.
"""

from collections.abc import Callable
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp


def gelu_erf(x: jax.Array) -> jax.Array:
    """The exact GELU as HF and PyTorch write it, ``x / 2 · (1 + erf(x / √2))``.

    ``nn.gelu(approximate=False)`` computes the same function through ``erfc``, whose XLA expansion ran the
    MiniLM step's GELU forward and backward slower on this CPU than ``erf`` (bench/model_ops.py).
    """
    return x * 0.5 * (1.0 + jax.lax.erf(x * 0.7071067811865476))  # python scalars keep x.dtype


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_erf,  # HF "gelu" is the exact erf form (BERT, RoBERTa)
    "gelu_new": partial(nn.gelu, approximate=True),  # GPT-2's tanh approximation
    "gelu_pytorch_tanh": partial(nn.gelu, approximate=True),
    "gelu_fast": partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation named by an HF config's ``hidden_act`` / ``activation_function``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} (config hidden_act); valid: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def dense(features: int, name: str, *, std: float, dtype, param_dtype, use_bias: bool = True) -> nn.Dense:
    """An ``nn.Dense`` initialised as HF initialises ``nn.Linear``: N(0, std) kernel, zero bias.

    Args:
      features: d_out; the kernel is ``[d_in, d_out]``.
      name: the submodule name, which becomes the param path segment (e.g. ``"query"``).
      std: the config's ``initializer_range``.
      dtype: compute dtype; param_dtype: storage dtype of kernel and bias.
      use_bias: whether the layer has a bias.
    """
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.initializers.normal(std),
        bias_init=nn.initializers.zeros,
        name=name,
    )


def embed(num: int, features: int, name: str, *, std: float, dtype, param_dtype) -> nn.Embed:
    """An ``nn.Embed`` [num, features] with HF's N(0, std) init (lookup is a ``jnp.take``)."""
    return nn.Embed(
        num, features, dtype=dtype, param_dtype=param_dtype, embedding_init=nn.initializers.normal(std), name=name
    )


class LayerNorm(nn.Module):
    """LayerNorm as BERT, RoBERTa and GPT-2 use it, ``(x - mean) / sqrt(var + eps) * scale + bias``, statistics in
    float32 (params ``scale`` and ``bias`` [d], as ``nn.LayerNorm``).

    The variance is taken of the centred input (two passes) and the scale is applied after the normalization,
    so the backward pass keeps one [..., d] residual instead of ``nn.LayerNorm``'s broadcast ``scale / std``
    (bench/model_ops.py), and the centred variance is the one PyTorch computes.
    """

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., d] -> [..., d] in ``dtype``."""
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nn.Module):
    """Llama's RMSNorm: ``x / sqrt(mean(x²) + eps) * scale`` with the statistics in float32."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., d] -> [..., d] in ``dtype``."""
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * scale.astype(self.dtype)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[b, t, h*hd] -> [b, t, h, hd] (a reshape of activations, never of a kernel)."""
    b, t, d = x.shape
    if d % num_heads:
        raise ValueError(f"feature size {d} is not divisible by num_heads={num_heads}")
    return x.reshape(b, t, num_heads, d // num_heads)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    dropout: Callable[[jax.Array], jax.Array] = lambda p: p,
) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads and a float32 softmax.

    Query heads are grouped over the key/value heads by reshaping q, so k and v are never repeated:
    head ``j`` of q uses kv head ``j // (h / kvh)``, as HF's ``repeat_kv`` does.

    The heads are moved in front of the tokens before the two products, and the mask is added to the scores
    as a bias (0 or float32 min) instead of selected: on a CPU the attention's forward and backward ran faster
    this way than as products over the [b, t, h, hd] layout with a select (bench/model_ops.py).

    Args:
      q: [b, t, h, hd] queries; k, v: [b, s, kvh, hd] with h % kvh == 0.
      mask: bool, broadcastable to [b, t, s]; False hides a key from a query.
      dropout: applied to the attention probabilities (identity when deterministic).

    Returns:
      [b, t, h * hd] in v's dtype.
    """
    b, t, h, hd = q.shape
    s, kvh = k.shape[1], k.shape[2]
    if h % kvh or k.shape != v.shape or k.shape[0] != b or k.shape[3] != hd:
        raise ValueError(f"attention shapes do not fit: q {q.shape}, k {k.shape}, v {v.shape}")
    q = q.reshape(b, t, kvh, h // kvh, hd).transpose(0, 2, 3, 1, 4)  # [b, kvh, g, t, hd]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kvh, s, hd]
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k).astype(jnp.float32)  # [b, kvh, g, t, s]
    bias = jnp.where(jnp.broadcast_to(mask, (b, t, s)), 0.0, jnp.finfo(jnp.float32).min)  # [b, t, s]
    scores = scores * jnp.float32(hd**-0.5) + bias[:, None, None]
    probs = dropout(jax.nn.softmax(scores, axis=-1).astype(v.dtype))
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)  # [b, kvh, g, t, hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * hd)
