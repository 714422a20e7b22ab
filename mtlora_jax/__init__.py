"""mtlora-jax: MTLoRA (arXiv 2403.07440) as pure functions over Flax parameter trees.

import mtlora_jax as mt
cfg = mt.MTLoRAConfig(rank=8, alpha=16.0, structure="shim", targets=(r".*/(query|value)/kernel",))
params = mt.init(params, cfg, key)                 # target leaves become mt.Adapted nodes
logits = mt.apply(model.apply)({"params": params}, x)
tx = mt.optimizer(optax.adamw(5e-4), params)       # frozen base: no state, no update
plain = mt.merge(params)                           # W + dW for inference
base = mt.quantize(params, "nf4", targets=(r".*/kernel",))  # QLoRA-style frozen base, before mt.init
"""

from mtlora_jax.adapted import Adapted, delta, is_adapted
from mtlora_jax.apply import apply
from mtlora_jax.checkpoint import (
    adapter_state,
    load_adapters,
    load_training_state,
    restore_adapter_state,
    save_adapters,
)
from mtlora_jax.inject import MTLoRAConfig, init
from mtlora_jax.masks import combine, optimizer, split, trainable_mask
from mtlora_jax.merge import merge, unmerge
from mtlora_jax.peft_format import load_peft, peft_lora_state
from mtlora_jax.quantize import dequantize, quantize
from mtlora_jax.quantized import Quantized, is_quantized
from mtlora_jax.sharding import adapter_specs, named_shardings, partition_specs
from mtlora_jax.structures import STRUCTURES, transform
from mtlora_jax.summary import count_params, quantized_bytes, summary

__all__ = [
    "STRUCTURES",
    "Adapted",
    "MTLoRAConfig",
    "Quantized",
    "adapter_specs",
    "adapter_state",
    "apply",
    "combine",
    "count_params",
    "delta",
    "dequantize",
    "init",
    "is_adapted",
    "is_quantized",
    "load_adapters",
    "load_peft",
    "load_training_state",
    "merge",
    "named_shardings",
    "optimizer",
    "partition_specs",
    "peft_lora_state",
    "quantize",
    "quantized_bytes",
    "restore_adapter_state",
    "save_adapters",
    "split",
    "summary",
    "trainable_mask",
    "transform",
    "unmerge",
]
