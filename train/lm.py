"""The causal-LM loss every decoder job shares (train.nlg, train.sft): token cross-entropy over weighted tokens.

A batch holds `input_ids`, `labels` (labels[j] = the token after input_ids[j]), `weights` (1 where labels[j] is
trained on) and `attention_mask`, all [b, t]; a packed batch (train/sft/batches.py) adds `position_ids` and
`segment_ids` [b, t], which go to the model so that each packed row sees only itself.
"""

import jax
import jax.numpy as jnp

import mtlora_jax as mt

PACKING_KEYS = ("position_ids", "segment_ids")


def token_nll(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-token loss [b, t]: (1 - eps) * nll + eps * mean_v(-log p_v), from logits [b, t, V] (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [b, t, V]
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]  # [b, t]
    return nll if not label_smoothing else (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)


def lm_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Token cross-entropy with label smoothing, averaged over weighted (target) tokens.

    Args:
      logits: [b, t, V]. labels: [b, t] int. weights: [b, t], 1 on target tokens.
      label_smoothing: eps; the target distribution is (1 - eps) * onehot + eps / V.

    Returns:
      scalar float32 loss: sum(w * ((1 - eps) * nll + eps * mean_v(-log p))) / sum(w).
    """
    weights = weights.astype(jnp.float32)
    return (token_nll(logits, labels, label_smoothing) * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of the decoder call beyond (input_ids, attention_mask): a packed batch's positions
    and segment ids."""
    return {k: batch[k] for k in PACKING_KEYS if k in batch}


def make_loss_fn(module, label_smoothing: float = 0.0):
    """loss_fn(params, frozen, batch, rng) -> (sum of token losses, {"weight": target tokens}) for train/loop.py."""

    def loss_fn(params, frozen, batch, rng):
        run = mt.apply(module.apply, rng=rng)  # adapter dropout
        logits = run({"params": mt.combine(params, frozen)}, batch["input_ids"], batch["attention_mask"],
                     **model_inputs(batch))  # fmt: skip
        weight = batch["weights"].sum()
        mean = lm_loss(logits, batch["labels"], batch["weights"], label_smoothing)
        return mean * jnp.maximum(weight, 1.0), {"weight": weight}

    return loss_fn
