"""Flax models for MTLoRA: BERT/RoBERTa encoders, GPT-2 and Llama decoders, and their checkpoint loaders.

    from mtlora_jax import models
    module, params = models.from_pretrained("path/to/roberta-base", head="classification", num_labels=3)
    logits = module.apply({"params": params}, input_ids, attention_mask)       # [b, 3]
    cfg = mt.MTLoRAConfig(rank=8, alpha=16, structure="shim",
                          targets=models.targets("mtlora-paper", "roberta"))

Every adaptable weight is a 2-D ``nn.Dense`` kernel [d_in, d_out]; param paths read like HF names
(``encoder/layer_3/attention/query/kernel``). See docs/MODELS.md for paths, scan/remat, dtypes,
the KV cache and left padding.
"""

from mtlora_jax.models.cache import init_cache
from mtlora_jax.models.config import EncoderConfig, GPT2Config, LlamaConfig
from mtlora_jax.models.encoder import Encoder
from mtlora_jax.models.gpt2 import GPT2
from mtlora_jax.models.hf_names import FAMILIES, hf_module_name, hf_tensor_name
from mtlora_jax.models.llama import Llama
from mtlora_jax.models.loading import build, from_pretrained, load_tokenizer
from mtlora_jax.models.presets import PRESETS, fused, head_targets, stack_ndim, targets
from mtlora_jax.models.stack import stack_params, unstack_params


def family(module) -> str:
    """The family name ("bert", "roberta", "gpt2", "llama") of one of our modules."""
    if isinstance(module, Encoder):
        return module.config.family
    if isinstance(module, GPT2):
        return "gpt2"
    if isinstance(module, Llama):
        return "llama"
    raise TypeError(f"{type(module).__name__} is not an mtlora_jax model")


__all__ = [
    "FAMILIES",
    "GPT2",
    "PRESETS",
    "Encoder",
    "EncoderConfig",
    "GPT2Config",
    "Llama",
    "LlamaConfig",
    "build",
    "family",
    "from_pretrained",
    "fused",
    "head_targets",
    "hf_module_name",
    "hf_tensor_name",
    "init_cache",
    "load_tokenizer",
    "stack_ndim",
    "stack_params",
    "targets",
    "unstack_params",
]
