"""Llama-family decoders (Touvron et al. 2023, arXiv 2302.13971): SmolLM2, Llama 2/3 and alikes.

Block: ``h = x + o_proj(Attn(rope(q), rope(k), v)); y = h + down_proj(silu(gate_proj(z)) * up_proj(z))``
with ``z = RMSNorm(h)`` and attention on ``RMSNorm(x)``. Grouped-query attention shares each k/v
head among ``num_heads / num_kv_heads`` query heads. The LM head is ``embed_tokens.attend`` when
``tie_word_embeddings`` (SmolLM2), else a separate ``lm_head`` kernel.

Param paths (``layers_{i}`` becomes ``layers`` with a leading layer axis under ``scan_layers``)::

    model/embed_tokens/embedding, model/norm/scale, lm_head/kernel (untied only)
    model/layers_{i}/{input_layernorm,post_attention_layernorm}/scale
    model/layers_{i}/self_attn/{q_proj,k_proj,v_proj,o_proj}/kernel
    model/layers_{i}/mlp/{gate_proj,up_proj,down_proj}/kernel

Decoding: see :mod:`mtlora_jax.models.cache` for the cache layout, masks and left padding.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mtlora_jax.models import cache as kv
from mtlora_jax.models import layers, rope
from mtlora_jax.models.stack import run_layers

HEADS = (None, "lm")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family model (HF LlamaConfig names where they differ in comments)."""

    vocab_size: int
    hidden_size: int
    num_layers: int  # num_hidden_layers
    num_heads: int  # num_attention_heads
    num_kv_heads: int  # num_key_value_heads
    head_dim: int
    intermediate_size: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, float | str], ...] = ()  # rope_parameters minus rope_theta, sorted
    max_positions: int = 2048  # max_position_embeddings
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    @classmethod
    def from_hf(cls, hf) -> "LlamaConfig":
        """Reads a ``transformers`` LlamaConfig (``rope_parameters``, or legacy ``rope_theta``/``rope_scaling``)."""
        if hf.model_type != "llama":
            raise ValueError(f"config model_type {hf.model_type!r} is not 'llama'")
        params = dict(getattr(hf, "rope_parameters", None) or {})
        if not params:
            params = {"rope_theta": getattr(hf, "rope_theta", 10000.0), **(getattr(hf, "rope_scaling", None) or {})}
        theta = params.pop("rope_theta")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"config partial_rotary_factor={params['partial_rotary_factor']} is not supported")
        scaling = tuple(sorted((k, v) for k, v in params.items() if v is not None and k != "partial_rotary_factor"))
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            intermediate_size=hf.intermediate_size,
            hidden_act=hf.hidden_act,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_positions=hf.max_position_embeddings,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            attention_bias=bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            attention_dropout=float(getattr(hf, "attention_dropout", 0.0)),
            initializer_range=hf.initializer_range,
        )


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
        c, bias = self.config, self.config.attention_bias
        q = layers.split_heads(self.dense(c.num_heads * c.head_dim, "q_proj", bias)(x), c.num_heads)
        k = layers.split_heads(self.dense(c.num_kv_heads * c.head_dim, "k_proj", bias)(x), c.num_kv_heads)
        v = layers.split_heads(self.dense(c.num_kv_heads * c.head_dim, "v_proj", bias)(x), c.num_kv_heads)
        q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
        drop = lambda p: nn.Dropout(c.attention_dropout)(p, deterministic=self.deterministic)
        out, new_cache = kv.self_attention(q, k, v, mask, layer_cache, start, drop)
        return self.dense(c.hidden_size, "o_proj", bias)(out), new_cache


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
    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, cache=None, deterministic=True):
        """Runs the decoder, optionally extending a KV cache.

        Args:
          input_ids: [b, t] token ids.
          attention_mask: [b, t] 1 = real token, 0 = padding (of these t tokens); None = all real.
          position_ids: [b, t]; None = count real tokens (correct for left and right padding).
          cache: None, or a cache from :func:`init_cache` / a previous call (see :mod:`cache`).
          deterministic: False enables attention dropout (``rngs={"dropout": key}``).

        Returns:
          logits [b, t, vocab] float32 (head "lm") or hidden states [b, t, d] (head None); with a
          cache, the tuple (that, new_cache).
        """
        c = self.config
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r} for Llama; valid: {HEADS}")
        mask, positions, meta = kv.prepare(input_ids, attention_mask, position_ids, cache)
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
