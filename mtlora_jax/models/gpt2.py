"""GPT-2 (Radford et al. 2019): a pre-LayerNorm causal decoder with learned positions and a tied LM head.

Block: ``h = x + c_proj(Attn(ln_1(x))); y = h + mlp.c_proj(gelu_new(mlp.c_fc(ln_2(h))))``.
``c_attn`` is ONE Dense kernel [d, 3d] (HF's Conv1D layout: q | k | v column blocks), so a fused
MTLoRA adapter (``presets.fused("mtlora-paper", "gpt2")``) sees the matrix the reference adapts;
q, k, v are split on the activations after the matmul. Logits are ``wte.attend(h)`` (tied).

Param paths (``h_{i}`` becomes ``h`` with a leading layer axis under ``scan_layers``)::

    transformer/{wte,wpe}/embedding, transformer/ln_f/{scale,bias}
    transformer/h_{i}/{ln_1,ln_2}/{scale,bias}
    transformer/h_{i}/attn/{c_attn,c_proj}/{kernel,bias}, transformer/h_{i}/mlp/{c_fc,c_proj}/{kernel,bias}

Decoding: see :mod:`mtlora_jax.models.cache` for the cache layout, masks and left padding. Packing:
``segment_ids`` with per-segment ``position_ids`` (which index ``wpe``), no cache.
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from mtlora_jax.models import cache as kv
from mtlora_jax.models import layers
from mtlora_jax.models.config import GPT2Config
from mtlora_jax.models.stack import run_layers

HEADS = (None, "lm")


class _Module(nn.Module):
    config: GPT2Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    deterministic: bool = True

    def dense(self, features: int, name: str, residual: bool = False) -> nn.Dense:
        # HF scales the init of residual projections (c_proj) by 1/sqrt(2 * n_layer).
        std = self.config.initializer_range / (math.sqrt(2 * self.config.num_layers) if residual else 1.0)
        return layers.dense(features, name, std=std, dtype=self.dtype, param_dtype=self.param_dtype)

    def layer_norm(self, name: str) -> layers.LayerNorm:
        return layers.LayerNorm(self.config.layer_norm_eps, self.dtype, self.param_dtype, name=name)

    def dropout(self, x, rate: float):
        return nn.Dropout(rate)(x, deterministic=self.deterministic)


class Attention(_Module):
    """Causal multi-head attention with the fused ``c_attn`` kernel."""

    @nn.compact
    def __call__(self, x, layer_cache, mask, start):
        """x: [b, t, d] -> ([b, t, d], new layer cache or None)."""
        c = self.config
        qkv = self.dense(3 * c.hidden_size, "c_attn")(x)  # [b, t, 3d], columns q | k | v
        q, k, v = (layers.split_heads(a, c.num_heads) for a in jnp.split(qkv, 3, axis=-1))
        out, new_cache = kv.self_attention(q, k, v, mask, layer_cache, start, lambda p: self.dropout(p, c.attn_dropout))
        return self.dropout(self.dense(c.hidden_size, "c_proj", residual=True)(out), c.resid_dropout), new_cache


class MLP(_Module):
    """``c_proj(act(c_fc(x)))``."""

    @nn.compact
    def __call__(self, x):
        """x: [b, t, d] -> [b, t, d]."""
        c = self.config
        h = layers.activation(c.activation)(self.dense(c.intermediate_size, "c_fc")(x))
        return self.dropout(self.dense(c.hidden_size, "c_proj", residual=True)(h), c.resid_dropout)


class Block(_Module):
    """One pre-LN block, called by the stack as ``(x, layer_cache, mask, start) -> (x, layer_cache)``."""

    @nn.compact
    def __call__(self, x, layer_cache, mask, start):
        args = (self.config, self.dtype, self.param_dtype, self.deterministic)
        h, new_cache = Attention(*args, name="attn")(self.layer_norm("ln_1")(x), layer_cache, mask, start)
        x = x + h
        return x + MLP(*args, name="mlp")(self.layer_norm("ln_2")(x)), new_cache


class Transformer(_Module):
    """The ``transformer`` subtree: embeddings, blocks, final LayerNorm and (``lm``) the tied head."""

    lm: bool = False
    scan_layers: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, positions, mask, layer_cache, start):
        c = self.config
        kw = dict(std=c.initializer_range, dtype=self.dtype, param_dtype=self.param_dtype)
        wte = layers.embed(c.vocab_size, c.hidden_size, "wte", **kw)
        x = wte(input_ids) + layers.embed(c.max_positions, c.hidden_size, "wpe", **kw)(positions)
        x = self.dropout(x, c.embd_dropout)
        block_kwargs = dict(config=c, dtype=self.dtype, param_dtype=self.param_dtype, deterministic=self.deterministic)
        x, new_cache = run_layers(
            Block,
            block_kwargs,
            x,
            layer_cache,
            (mask, start),
            num_layers=c.num_layers,
            scan=self.scan_layers,
            remat=self.remat,
            layer_name="h",
            scan_name="h",
        )
        x = self.layer_norm("ln_f")(x)
        return (wte.attend(x) if self.lm else x), new_cache


class GPT2(nn.Module):
    """GPT-2 with an optional tied LM head.

    Attributes:
      config: the architecture. head: None (hidden states) or "lm" (logits over the vocabulary).
      dtype: compute dtype; param_dtype: storage. scan_layers / remat: see :mod:`stack`.
    """

    config: GPT2Config
    head: str | None = "lm"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False
    remat: bool = False

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, position_ids=None, *, segment_ids=None, cache=None, deterministic=True
    ):
        """Runs the decoder, optionally extending a KV cache.

        Args:
          input_ids: [b, t] token ids.
          attention_mask: [b, t] 1 = real token, 0 = padding (of these t tokens); None = all real.
          position_ids: [b, t] (the rows of ``wpe`` to add); None = count real tokens (correct for left
            and right padding).
          segment_ids: [b, t] int or None: packed sequences, a token attends only to earlier tokens of
            the same segment (pads may use 0 together with ``attention_mask``); needs ``position_ids``
            restarting at 0 in every segment; no cache.
          cache: None, or a cache from :func:`init_cache` / a previous call (see :mod:`cache`).
          deterministic: False enables dropout (``rngs={"dropout": key}``).

        Returns:
          logits [b, t, vocab] float32 (head "lm") or hidden states [b, t, d] (head None); with a
          cache, the tuple (that, new_cache).
        """
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r} for GPT-2; valid: {HEADS}")
        mask, positions, meta = kv.prepare(input_ids, attention_mask, position_ids, cache, segment_ids=segment_ids)
        layer_cache = None if cache is None else (cache["k"], cache["v"])
        start = None if meta is None else meta["start"]
        out, new_layers = Transformer(
            self.config,
            self.dtype,
            self.param_dtype,
            deterministic,
            lm=self.head == "lm",
            scan_layers=self.scan_layers,
            remat=self.remat,
            name="transformer",
        )(input_ids, positions, mask, layer_cache, start)
        if self.head == "lm":
            out = out.astype(jnp.float32)
        return out if cache is None else (out, kv.finish(meta, *new_layers))
