"""The key/value cache of the decoders (GPT-2, Llama): layout, masks and positions.

A cache is a plain dict of arrays, every leaf with the batch as axis 0, so beam search can reorder
rows with ``jax.tree.map(lambda x: x[idx], cache)``::

    k, v      [b, num_layers, max_length, num_kv_heads, head_dim]  keys/values of every written slot
    mask      [b, max_length] bool    True where a slot holds a real (non-padding) token
    index     [b] int32               slots written so far (equal across rows)
    position  [b] int32               real tokens seen so far = the next token's position id

Calling a decoder with ``cache=`` writes the t new tokens into slots ``index .. index+t-1`` and
returns ``(logits, new_cache)``. ``attention_mask`` then covers the *new* tokens only ([b, t], None =
all real); the cache remembers the mask of earlier slots. A query at slot i sees slot j iff j <= i
and ``mask[j]``. Position ids count real tokens only: ``position + cumsum(new_mask) - 1``.

Sliding window w (Mistral, Qwen2): a query at index i also needs ``j > i - w``, with i, j the token
indices of the row (slots with a cache, pads included), exactly as HF's ``sliding_window_overlay``.

Packing (no cache only): ``segment_ids`` [b, t] lets a query see only keys of its own segment, so
several sequences share a row; pass ``position_ids`` that restart at 0 in every segment.

Left-padded prompts: pass the padded prompt batch [b, t] with its 0/1 mask as the first call. Pad
slots stay masked for the rest of decoding, and each row's first real token gets position 0, so a
row decodes exactly as it would alone (HF's ``generate`` uses the same positions). Then feed one
token per row per step with ``attention_mask=None``. Writing past ``max_length`` is not checked
inside jit (slots are clamped), so size the cache for prompt length plus new tokens.
"""

import jax
import jax.numpy as jnp

from mtlora_jax.models import layers


def init_cache(module, batch_size: int, max_length: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """An empty cache for a decoder module (GPT-2 or Llama).

    Args:
      module: the Flax decoder; its ``config`` gives num_layers, num_kv_heads and head_dim.
      batch_size: rows b (after any beam expansion).
      max_length: slots per row: prompt length plus tokens to generate.
      dtype: storage dtype of k and v (use the module's compute dtype).

    Returns:
      The dict described in the module docstring, all zeros / False.
    """
    cfg = getattr(module, "config", None)
    if cfg is None or not hasattr(cfg, "num_kv_heads"):
        raise TypeError(f"init_cache needs a decoder module (GPT-2 or Llama), got {type(module).__name__}")
    kv_shape = (batch_size, cfg.num_layers, max_length, cfg.num_kv_heads, cfg.head_dim)
    return {
        "k": jnp.zeros(kv_shape, dtype),
        "v": jnp.zeros(kv_shape, dtype),
        "mask": jnp.zeros((batch_size, max_length), bool),
        "index": jnp.zeros((batch_size,), jnp.int32),
        "position": jnp.zeros((batch_size,), jnp.int32),
    }


def _write(buffer: jax.Array, update: jax.Array, start: jax.Array) -> jax.Array:
    """Writes update [b, t, ...] into buffer [b, S, ...] at per-row slot start [b]."""
    return jax.vmap(lambda buf, upd, i: jax.lax.dynamic_update_slice_in_dim(buf, upd, i, axis=0))(
        buffer, update.astype(buffer.dtype), start
    )


def _positions(valid: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """Position ids [b, t] that count real tokens only (pads get the previous id, clipped at 0)."""
    return offset + jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


def _visible(query: jax.Array, key: jax.Array, window: int | None) -> jax.Array:
    """Causal (and sliding-window) visibility of key index ``key`` from query index ``query`` (broadcast)."""
    seen = key <= query
    return seen if window is None else seen & (key > query - window)


def prepare(
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    position_ids: jax.Array | None,
    cache: dict | None,
    *,
    sliding_window: int | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, dict | None]:
    """The attention mask, position ids and cache metadata of one decoder call.

    Args:
      input_ids: [b, t] token ids.
      attention_mask: [b, t] 1 for real tokens, 0 for padding; None means all real.
      position_ids: [b, t] explicit positions, or None to count real tokens (see module docstring).
      cache: None for a plain causal forward, else the cache dict before this call.
      sliding_window: None (full causal attention) or w: query index i sees key j iff i - w < j <= i.
      segment_ids: [b, t] int, packed sequences (no cache): a query sees keys of its own segment only;
        needs explicit ``position_ids`` (restarting at 0 per segment).

    Returns:
      mask: bool [b, t, s] (s = t without a cache, max_length with one), causal and padding-aware.
      positions: [b, t] int32.
      meta: None without a cache, else the new ``mask``, ``index``, ``position`` entries plus
        ``start`` [b], the first slot written by this call.
    """
    b, t = input_ids.shape
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if valid.shape != (b, t):
        raise ValueError(f"attention_mask shape {valid.shape} != input_ids shape {(b, t)}")
    if segment_ids is not None:
        if cache is not None:
            raise ValueError("segment_ids (packed sequences) are only supported without a cache")
        if position_ids is None:
            raise ValueError("segment_ids need explicit position_ids that restart at 0 in every segment")
        if segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids shape {segment_ids.shape} != input_ids shape {(b, t)}")
    if cache is None:
        positions = _positions(valid) if position_ids is None else position_ids
        index = jnp.arange(t)
        mask = valid[:, None, :] & _visible(index[:, None], index[None, :], sliding_window)[None]  # [b, t, t]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        return mask, positions, None
    start = cache["index"]
    slots = cache["mask"].shape[1]
    if t > slots:
        raise ValueError(f"{t} new tokens do not fit a cache of max_length {slots}")
    positions = _positions(valid, cache["position"][:, None]) if position_ids is None else position_ids
    key_mask = _write(cache["mask"], valid, start)  # [b, S]
    query_slot = start[:, None] + jnp.arange(t)  # [b, t]
    visible = _visible(query_slot[:, :, None], jnp.arange(slots)[None, None, :], sliding_window)  # [b, t, S]
    mask = key_mask[:, None, :] & visible
    meta = {
        "mask": key_mask,
        "index": start + t,
        "position": cache["position"] + valid.sum(axis=1, dtype=jnp.int32),
        "start": start,
    }
    return mask, positions, meta


def update_layer(layer_cache: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array, start: jax.Array):
    """Writes one layer's new keys/values and returns the full cached ones.

    Args:
      layer_cache: (k, v), each [b, S, kvh, hd], this layer's slice of the cache.
      k, v: [b, t, kvh, hd] for the new tokens.
      start: [b] first slot to write.

    Returns:
      (k_all, v_all), each [b, S, kvh, hd]; they are both the attention inputs and the new cache.
    """
    return _write(layer_cache[0], k, start), _write(layer_cache[1], v, start)


def finish(meta: dict, k: jax.Array, v: jax.Array) -> dict:
    """Assembles the new cache from the stacked per-layer k, v [b, L, S, kvh, hd] and ``meta``."""
    return {"k": k, "v": v, "mask": meta["mask"], "index": meta["index"], "position": meta["position"]}


def self_attention(q, k, v, mask, layer_cache, start, dropout=lambda p: p):
    """Causal self-attention for one decoder layer, with or without a cache.

    Args:
      q: [b, t, h, hd]; k, v: [b, t, kvh, hd] for the new tokens.
      mask: bool [b, t, s] from :func:`prepare`.
      layer_cache: None, or this layer's (k, v) cache, each [b, S, kvh, hd].
      start: [b] first slot to write (ignored without a cache).
      dropout: applied to the attention probabilities.

    Returns:
      (out [b, t, h*hd], new layer cache (k, v) or None).
    """
    if layer_cache is None:
        return layers.attention(q, k, v, mask, dropout), None
    k_all, v_all = update_layer(layer_cache, k, v, start)
    return layers.attention(q, k_all, v_all, mask, dropout), (k_all, v_all)
