"""Where the params and the optimizer state live on the mesh, and in which dtype the frozen base is stored.

Base weights follow the model family's logical axes (`mtlora_jax.models.partitioning`: embed -> "fsdp",
heads / mlp / vocab -> "tensor", replicated where an axis is absent or does not divide); every adapter follows
its base weight (`mt.partition_specs`: A split like W's input axis, B like W's output axis, C and D
replicated); the task head and norms are replicated; optimizer moments are sharded like their params. On a
mesh with only a "data" axis everything is replicated (plain data parallelism).

    trainable, frozen, shardings = placement.place(params, heads, family="bert", mesh=mesh, base_dtype="bfloat16")
    state, state_shardings = loop.create_train_state(trainable, tx, rng, mesh, shardings.trainable)
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import mtlora_jax as mt
from mtlora_jax.models import partitioning
from train import mesh as mesh_lib

BASE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Shardings(NamedTuple):
    """NamedSharding trees of the two halves of `mt.split(params, extra_trainable)` (None where absent)."""

    trainable: Any
    frozen: Any


def param_shardings(params, family: str, mesh, rules=None):
    """A NamedSharding for every leaf of `params` (arrays, ShapeDtypeStructs, `mt.Adapted` leaves).

    Args:
      params: the adapted params of a model of `family` ("bert", "roberta", "gpt2", "llama").
      mesh: the device mesh; its "fsdp" and "tensor" axes split the base weights.
      rules: logical axis (embed, heads, mlp, vocab) -> mesh axis; None: `partitioning.DEFAULT_RULES`.
    """
    rules = partitioning.DEFAULT_RULES if rules is None else rules
    specs = mt.partition_specs(params, partitioning.base_spec_fn(family, mesh, rules), mesh)
    return mt.named_shardings(specs, mesh)


def config_rules(config) -> dict[str, str | None]:
    """config.partition_rules as `partitioning` rules: logical axis -> mesh axis, "" -> None (replicated)."""
    return {name: axis or None for name, axis in config.partition_rules.items()}


def cast_base(frozen, base_dtype: str):
    """The frozen half with its matrices (>= 2-D floating leaves: kernels, embeddings) stored in `base_dtype`.

    Norm scales, biases and quantized matrices (`mt.quantize`) stay as they are. Raises ValueError naming
    config.base_dtype for an unknown dtype.
    """
    if base_dtype not in BASE_DTYPES:
        raise ValueError(f"config.base_dtype={base_dtype!r}: expected one of {', '.join(BASE_DTYPES)}")
    dtype = BASE_DTYPES[base_dtype]
    keep = lambda x: mt.is_quantized(x) or not (x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating))
    return jax.tree.map(lambda x: x if keep(x) else x.astype(dtype), frozen, is_leaf=mt.is_quantized)


def place(params, extra_trainable, *, family: str, mesh, base_dtype: str = "float32", rules=None):
    """Splits the adapted params into (trainable, frozen) halves placed on their shardings.

    Args:
      params: the adapted tree (`mt.init` output), on any devices.
      extra_trainable: regexes of the non-adapter leaves that train (the task head).
      family: the model family (partitioning table).
      mesh: the device mesh.
      base_dtype: storage dtype of the frozen matrices ("float32" or "bfloat16": half the memory).
      rules: logical axis -> mesh axis (config.partition_rules); None: `partitioning.DEFAULT_RULES`.

    Returns:
      (trainable, frozen, Shardings): both halves are global arrays on `mesh`.
    """
    shardings = param_shardings(params, family, mesh, rules)
    trainable, frozen = mt.split(params, extra_trainable)
    trainable_sh, frozen_sh = mt.split(shardings, extra_trainable)
    frozen = cast_base(frozen, base_dtype)
    trainable, frozen = jax.device_put(trainable, trainable_sh), jax.device_put(frozen, frozen_sh)
    return trainable, frozen, Shardings(trainable_sh, frozen_sh)


def opt_state_shardings(tx: optax.GradientTransformation, params, params_shardings, mesh):
    """Shardings of `tx.init(params)`: each moment like its param, counters and other leaves replicated."""
    abstract = jax.eval_shape(tx.init, params)
    rep = mesh_lib.replicated(mesh)
    return optax.tree_map_params(tx, lambda _, s: s, abstract, params_shardings, transform_non_params=lambda _: rep)
