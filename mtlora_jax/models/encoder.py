"""BERT and RoBERTa encoders (Devlin et al. 2018, arXiv 1810.04805; Liu et al. 2019, arXiv 1907.11692).

Post-LayerNorm blocks: ``h = LN(x + Attn(x)); y = LN(h + W2 act(W1 h))`` with learned absolute
positions and token types. RoBERTa differs only in its position ids, which start after the padding
index: ``pos = cumsum(ids != pad) * (ids != pad) + pad``, and in its classification head.

Param paths (unrolled; with ``scan_layers`` the ``layer_{i}`` subtrees become one ``layers`` subtree
with a leading layer axis)::

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding, embeddings/LayerNorm
    encoder/layer_{i}/attention/{query,key,value}/{kernel,bias}
    encoder/layer_{i}/attention/output/{dense,LayerNorm}
    encoder/layer_{i}/intermediate/dense,  encoder/layer_{i}/output/{dense,LayerNorm}
    pooler/dense, classifier/{kernel,bias}                  (BERT heads)
    classifier/dense, classifier/out_proj                   (RoBERTa head)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtlora_jax.models import layers
from mtlora_jax.models.config import EncoderConfig
from mtlora_jax.models.stack import run_layers

HEADS = (None, "classification", "regression")


class _Module(nn.Module):
    """Common attributes: the config, compute/param dtypes and dropout mode."""

    config: EncoderConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    deterministic: bool = True

    def dense(self, features: int, name: str) -> nn.Dense:
        return layers.dense(
            features, name, std=self.config.initializer_range, dtype=self.dtype, param_dtype=self.param_dtype
        )

    def layer_norm(self) -> layers.LayerNorm:
        return layers.LayerNorm(self.config.layer_norm_eps, self.dtype, self.param_dtype, name="LayerNorm")

    def dropout(self, x: jax.Array, rate: float) -> jax.Array:
        return nn.Dropout(rate)(x, deterministic=self.deterministic)


class Embeddings(_Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids):
        """ids: [b, t] each -> [b, t, d]."""
        c = self.config
        kw = dict(std=c.initializer_range, dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.embed(c.vocab_size, c.hidden_size, "word_embeddings", **kw)(input_ids)
        x = x + layers.embed(c.max_position_embeddings, c.hidden_size, "position_embeddings", **kw)(position_ids)
        x = x + layers.embed(c.type_vocab_size, c.hidden_size, "token_type_embeddings", **kw)(token_type_ids)
        return self.dropout(self.layer_norm()(x), c.hidden_dropout)


class DenseResidualNorm(_Module):
    """HF's BertSelfOutput / BertOutput: ``LN(residual + dropout(dense(x)))``."""

    @nn.compact
    def __call__(self, x, residual):
        """x: [b, t, d_in], residual: [b, t, d] -> [b, t, d]."""
        h = self.dropout(self.dense(self.config.hidden_size, "dense")(x), self.config.hidden_dropout)
        return self.layer_norm()(h + residual)


class SelfAttention(_Module):
    """Bidirectional multi-head attention with separate query/key/value kernels."""

    @nn.compact
    def __call__(self, x, mask):
        """x: [b, t, d], mask: bool [b, 1, t] -> [b, t, d]."""
        c = self.config
        q, k, v = (layers.split_heads(self.dense(c.hidden_size, n)(x), c.num_heads) for n in ("query", "key", "value"))
        ctx = layers.attention(q, k, v, mask, dropout=lambda p: self.dropout(p, c.attention_dropout))
        return DenseResidualNorm(c, self.dtype, self.param_dtype, self.deterministic, name="output")(ctx, x)


class Intermediate(_Module):
    """The FFN's first projection and activation."""

    @nn.compact
    def __call__(self, x):
        """x: [b, t, d] -> [b, t, intermediate_size]."""
        return layers.activation(self.config.hidden_act)(self.dense(self.config.intermediate_size, "dense")(x))


class EncoderLayer(_Module):
    """One post-LN block; the stack calls it as ``(x, layer_cache=None, mask) -> (x, None)``."""

    @nn.compact
    def __call__(self, x, layer_cache, mask):
        """x: [b, t, d], mask: bool [b, 1, t] -> ([b, t, d], None)."""
        args = (self.config, self.dtype, self.param_dtype, self.deterministic)
        h = SelfAttention(*args, name="attention")(x, mask)
        y = DenseResidualNorm(*args, name="output")(Intermediate(*args, name="intermediate")(h), h)
        return y, layer_cache


class EncoderStack(_Module):
    """The ``encoder`` subtree: ``num_layers`` blocks, unrolled or scanned."""

    scan_layers: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, x, mask):
        """x: [b, t, d], mask: bool [b, 1, t] -> [b, t, d]."""
        kwargs = dict(
            config=self.config, dtype=self.dtype, param_dtype=self.param_dtype, deterministic=self.deterministic
        )
        x, _ = run_layers(
            EncoderLayer,
            kwargs,
            x,
            None,
            (mask,),
            num_layers=self.config.num_layers,
            scan=self.scan_layers,
            remat=self.remat,
            layer_name="layer",
            scan_name="layers",
        )
        return x


class Pooler(_Module):
    """HF BertPooler: ``tanh(dense(h_first))``."""

    @nn.compact
    def __call__(self, first):
        """first: [b, d] -> [b, d]."""
        return jnp.tanh(self.dense(self.config.hidden_size, "dense")(first))


class RobertaHead(_Module):
    """HF RobertaClassificationHead: ``out_proj(dropout(tanh(dense(dropout(h_first)))))``."""

    num_outputs: int = 2

    @nn.compact
    def __call__(self, first):
        """first: [b, d] -> [b, num_outputs]."""
        rate = head_dropout(self.config)
        x = jnp.tanh(self.dense(self.config.hidden_size, "dense")(self.dropout(first, rate)))
        return self.dense(self.num_outputs, "out_proj")(self.dropout(x, rate))


def head_dropout(c: EncoderConfig) -> float:
    """The classifier dropout rate: ``classifier_dropout`` or, when unset, ``hidden_dropout``."""
    return c.hidden_dropout if c.classifier_dropout is None else c.classifier_dropout


class Encoder(nn.Module):
    """BERT/RoBERTa encoder with an optional sequence head.

    Attributes:
      config: the architecture. head: None (hidden states), "classification" or "regression".
      num_labels: classifier width (regression forces 1). dtype: compute dtype; param_dtype: storage.
      scan_layers: stack layers with ``nn.scan``. remat: rematerialise each layer in the backward pass.
    """

    config: EncoderConfig
    head: str | None = None
    num_labels: int = 2
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, deterministic=True):
        """Runs the encoder.

        Args:
          input_ids: [b, t] int token ids.
          attention_mask: [b, t] 1 for real tokens, 0 for padding (keys only); None = all real.
          token_type_ids: [b, t] segment ids; None = zeros.
          position_ids: [b, t]; None = 0..t-1 (BERT) or RoBERTa's padding-offset positions.
          deterministic: False enables dropout (pass ``rngs={"dropout": key}`` to ``apply``).

        Returns:
          head None: hidden states [b, t, d]; "classification": logits [b, num_labels] float32;
          "regression": scores [b] float32.
        """
        c = self.config
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; valid: {HEADS}")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = self._positions(input_ids)
        args = (c, self.dtype, self.param_dtype, deterministic)
        x = Embeddings(*args, name="embeddings")(input_ids, token_type_ids, position_ids)
        mask = attention_mask.astype(bool)[:, None, :]  # [b, 1, t]: every query sees every real key
        x = EncoderStack(*args, scan_layers=self.scan_layers, remat=self.remat, name="encoder")(x, mask)
        if self.head is None:
            return x
        n = 1 if self.head == "regression" else self.num_labels
        first = x[:, 0]  # [b, d]: the [CLS] / <s> token
        if c.family == "roberta":
            logits = RobertaHead(*args, num_outputs=n, name="classifier")(first)
        else:
            pooled = nn.Dropout(head_dropout(c))(Pooler(*args, name="pooler")(first), deterministic=deterministic)
            logits = layers.dense(
                n, "classifier", std=c.initializer_range, dtype=self.dtype, param_dtype=self.param_dtype
            )(pooled)
        logits = logits.astype(jnp.float32)
        return logits[:, 0] if self.head == "regression" else logits

    def _positions(self, input_ids):
        """Default position ids [b, t]: 0..t-1, or RoBERTa's ``cumsum(real) * real + pad``."""
        if self.config.family == "roberta":
            pad = self.config.pad_token_id
            real = (input_ids != pad).astype(jnp.int32)
            return jnp.cumsum(real, axis=1) * real + pad
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
