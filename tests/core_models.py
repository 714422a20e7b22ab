"""Tiny models and float64 numpy references shared by the core-library tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import mtlora_jax as mt

D_IN, D_OUT, RANK = 13, 17, 3  # distinct odd sizes: a transposed shape cannot hide


def np_t(structure: str, c, d):
    """T from C and D in float64 numpy, written independently of mtlora_jax.structures."""
    c = None if c is None else np.asarray(c, np.float64)
    d = None if d is None else np.asarray(d, np.float64)
    return {
        "lora": lambda: None,
        "shim": lambda: c,
        "icfm": lambda: c @ c.T,
        "ctcm": lambda: c @ d,
        "dtsm": lambda: c + d,
    }[structure]()


def np_delta_torch(ad: mt.Adapted) -> np.ndarray:
    """alpha/r · B_full · T · A in float64 (torch orientation [d_out, d_in]), block-diagonal B for fused."""
    a = np.asarray(ad.a, np.float64)
    b = np.asarray(ad.b, np.float64)
    t = np_t(ad.structure, ad.c, ad.d)
    r = b.shape[-1]
    if ad.slices > 1:
        k = sum(ad.enable)
        d_slice = b.shape[0] // k
        full = np.zeros((d_slice * ad.slices, k * r))
        j = 0
        for s, on in enumerate(ad.enable):
            if on:
                full[s * d_slice : (s + 1) * d_slice, j * r : (j + 1) * r] = b[j * d_slice : (j + 1) * d_slice]
                j += 1
        b = full
    bt = b if t is None else b @ t
    return ad.scale * bt @ a


def np_merged(ad: mt.Adapted) -> np.ndarray:
    """w + dW in w's layout, float64."""
    w = np.asarray(ad.w, np.float64)
    return w + np_delta_torch(ad).T.reshape(w.shape)


def cfg(structure: str, targets, **kw) -> mt.MTLoRAConfig:
    """A config with nonzero B (so dW != 0 and every factor gets gradients)."""
    kw.setdefault("rank", RANK)
    return mt.MTLoRAConfig(alpha=6.0, structure=structure, targets=targets, b_init="gaussian", **kw)


class MLP(nn.Module):
    """Dense [D_IN -> D_OUT] -> tanh -> Dense [D_OUT -> 2]."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(D_OUT, name="fc1")(x))
        return nn.Dense(2, name="fc2")(h)


class TiedLM(nn.Module):
    """Embed lookup, a Dense, and the tied output head (`attend`): gather, dot_general, transposed use."""

    vocab: int = 19
    dim: int = D_IN

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(self.vocab, self.dim, name="embed")
        h = nn.Dense(self.dim, name="proj")(emb(ids))
        return emb.attend(jnp.tanh(h))


def init_model(model: nn.Module, x, seed: int = 0):
    return model.init(jax.random.key(seed), x)["params"]
