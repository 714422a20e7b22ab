"""Llama-family decoders (Touvron et al. 2023, arXiv 2302.13971): SmolLM2, Llama 2/3, Qwen2/2.5, Mistral.

Block: ``h = x + o_proj(Attn(rope(q), rope(k), v)); y = h + down_proj(silu(gate_proj(z)) * up_proj(z))``
with ``z = RMSNorm(h)`` and attention on ``RMSNorm(x)``. Grouped-query attention shares each k/v
head among ``num_heads / num_kv_heads`` query heads. The LM head is ``embed_tokens.attend`` when
``tie_word_embeddings`` (SmolLM2, Qwen2.5-0.5B), else a separate ``lm_head`` kernel.

Variants (read from the HF config by :class:`LlamaConfig`): ``qkv_bias`` adds biases to q/k/v_proj and
``o_bias`` to o_proj (Llama's ``attention_bias`` sets both; Qwen2 has q/k/v biases only);
``sliding_window`` w limits each query i to keys i - w < j <= i (Mistral). ``segment_ids`` packs several
sequences in one row (see :mod:`mtlora_jax.models.cache`).

Param paths (``layers_{i}`` becomes ``layers`` with a leading layer axis under ``scan_layers``)::

    model/embed_tokens/embedding, model/norm/scale, lm_head/kernel (untied only)
    model/layers_{i}/{input_layernorm,post_attention_layernorm}/scale
    model/layers_{i}/self_attn/{q_proj,k_proj,v_proj,o_proj}/kernel (+ /bias per qkv_bias / o_bias)
    model/layers_{i}/mlp/{gate_proj,up_proj,down_proj}/kernel

Decoding: see :mod:`mtlora_jax.models.cache` for the cache layout, masks and left padding.
"""

import flax.linen as nn
import jax.numpy as jnp

from mtlora_jax.models import cache as kv
from mtlora_jax.models import layers, rope
from mtlora_jax.models.config import LlamaConfig
from mtlora_jax.models.stack import run_layers

HEADS = (None, "lm")


class _Module(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    deterministic: bool = True

    def dense(self, features: int, name: str, use_bias: bool) -> nn.Dense:
        return layers.dense(
            features,
            name,
            std=self.config.initializer_range,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def norm(self, name: str) -> layers.RMSNorm:
        return layers.RMSNorm(self.config.rms_norm_eps, self.dtype, self.param_dtype, name=name)


class Attention(_Module):
    """Grouped-query causal attention with RoPE."""

    @nn.compact
    def __call__(self, x, layer_cache, mask, cos, sin, start):
        """x: [b, t, d]; cos, sin: [b, t, 1, hd] -> ([b, t, d], new layer cache or None)."""
        c, bias = self.config, self.config.qkv_bias
        q = layers.split_heads(self.dense(c.num_heads * c.head_dim, "q_proj", bias)(x), c.num_heads)
        k = layers.split_heads(self.dense(c.num_kv_heads * c.head_dim, "k_proj", bias)(x), c.num_kv_heads)
        v = layers.split_heads(self.dense(c.num_kv_heads * c.head_dim, "v_proj", bias)(x), c.num_kv_heads)
        q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
        drop = lambda p: nn.Dropout(c.attention_dropout)(p, deterministic=self.deterministic)
        out, new_cache = kv.self_attention(q, k, v, mask, layer_cache, start, drop)
        return self.dense(c.hidden_size, "o_proj", c.o_bias)(out), new_cache


class MLP(_Module):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    @nn.compact
    def __call__(self, x):
        """x: [b, t, d] -> [b, t, d]."""
        c = self.config
        gate = layers.activation(c.hidden_act)(self.dense(c.intermediate_size, "gate_proj", c.mlp_bias)(x))
        return self.dense(c.hidden_size, "down_proj", c.mlp_bias)(
            gate * self.dense(c.intermediate_size, "up_proj", c.mlp_bias)(x)
        )


class Block(_Module):
    """One pre-RMSNorm block: ``(x, layer_cache, mask, cos, sin, start) -> (x, layer_cache)``."""

    @nn.compact
    def __call__(self, x, layer_cache, mask, cos, sin, start):
        args = (self.config, self.dtype, self.param_dtype, self.deterministic)
        h, new_cache = Attention(*args, name="self_attn")(
            self.norm("input_layernorm")(x), layer_cache, mask, cos, sin, start
        )
        x = x + h
        return x + MLP(*args, name="mlp")(self.norm("post_attention_layernorm")(x)), new_cache


class Body(_Module):
    """The ``model`` subtree: embeddings, blocks, final norm and (tied ``lm``) the tied head."""

    tied_lm: bool = False
    scan_layers: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, positions, mask, layer_cache, start):
        c = self.config
        embed = layers.embed(
            c.vocab_size,
            c.hidden_size,
            "embed_tokens",
            std=c.initializer_range,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        cos, sin = rope.rotary_tables(positions, rope.inv_frequencies(c.head_dim, c.rope_theta, c.rope_scaling))
        block_kwargs = dict(config=c, dtype=self.dtype, param_dtype=self.param_dtype, deterministic=self.deterministic)
        x, new_cache = run_layers(
            Block,
            block_kwargs,
            embed(input_ids),
            layer_cache,
            (mask, cos, sin, start),
            num_layers=c.num_layers,
            scan=self.scan_layers,
            remat=self.remat,
            layer_name="layers",
            scan_name="layers",
        )
        x = self.norm("norm")(x)
        return (embed.attend(x) if self.tied_lm else x), new_cache


class Llama(nn.Module):
    """A Llama-family causal LM.

    Attributes:
      config: the architecture. head: None (hidden states) or "lm" (logits).
      dtype: compute dtype; param_dtype: storage. scan_layers / remat: see :mod:`stack`.
    """

    config: LlamaConfig
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
          position_ids: [b, t]; None = count real tokens (correct for left and right padding).
          segment_ids: [b, t] int or None: packed sequences, a token attends only to earlier tokens of
            the same segment (pads may use 0 together with ``attention_mask``); needs ``position_ids``
            restarting at 0 in every segment; no cache.
          cache: None, or a cache from :func:`init_cache` / a previous call (see :mod:`cache`).
          deterministic: False enables attention dropout (``rngs={"dropout": key}``).

        Returns:
          logits [b, t, vocab] float32 (head "lm") or hidden states [b, t, d] (head None); with a
          cache, the tuple (that, new_cache).
        """
        c = self.config
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r} for Llama; valid: {HEADS}")
        mask, positions, meta = kv.prepare(
            input_ids, attention_mask, position_ids, cache, sliding_window=c.sliding_window, segment_ids=segment_ids
        )
        layer_cache = None if cache is None else (cache["k"], cache["v"])
        start = None if meta is None else meta["start"]
        lm = self.head == "lm"
        out, new_layers = Body(
            c,
            self.dtype,
            self.param_dtype,
            deterministic,
            tied_lm=lm and c.tie_word_embeddings,
            scan_layers=self.scan_layers,
            remat=self.remat,
            name="model",
        )(input_ids, positions, mask, layer_cache, start)
        if lm and not c.tie_word_embeddings:
            out = layers.dense(
                c.vocab_size,
                "lm_head",
                std=c.initializer_range,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )(out)
        if lm:
            out = out.astype(jnp.float32)
        return out if cache is None else (out, kv.finish(meta, *new_layers))
