"""The model of a run: the base checkpoint (`config.model`), its tokenizer, and the MTLoRA adapters on it.

`load(config, head=..., mesh=...)` reads a hub id, a local Hugging Face folder or a .gguf file (the weights go from
the host straight to their shards on the mesh); `add_adapters(config, model)` injects the `config.mtlora`
adapters (then `config.init_from`'s factors). Every failure names the config key to change.
"""

import dataclasses
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from absl import logging

import mtlora_jax as mt
from mtlora_jax import models
from mtlora_jax.models import hf_names
from mtlora_jax.paths import named_leaves, path_str
from train import checkpoints, hub, placement

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# family -> (the HF class of a job's model, its backbone prefix, PEFT task type): export's names
HF_CLASSES = {
    "bert": ("BertForSequenceClassification", hf_names.TASK_PREFIX["bert"], "SEQ_CLS"),
    "roberta": ("RobertaForSequenceClassification", hf_names.TASK_PREFIX["roberta"], "SEQ_CLS"),
    "gpt2": ("GPT2LMHeadModel", hf_names.TASK_PREFIX["gpt2"], "CAUSAL_LM"),
    "llama": ("LlamaForCausalLM", hf_names.TASK_PREFIX["llama"], "CAUSAL_LM"),
}
MODEL_HINT = "pass --config.model=<local HF folder (config.json, model.safetensors, tokenizer files) or .gguf file>"


class Model(NamedTuple):
    """A loaded base model.

    Attributes:
      module: the Flax module (`module.apply(variables, input_ids, attention_mask, ...)`).
      params: its parameter tree (plain arrays; adapted leaves after `add_adapters`).
      tokenizer: the HF fast tokenizer of the checkpoint.
      family: the model family ("bert", "roberta", "gpt2", "llama", ...).
      head: None, "classification", "regression" or "lm".
    """

    module: Any
    params: Any
    tokenizer: Any
    family: str
    head: str | None


def check_source(model: str) -> None:
    """Fails fast, naming config.model, when `model` is neither an existing path nor a reachable hub id."""
    if os.path.exists(os.path.expanduser(model)):
        return
    if model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"config.model={model!r}: no such file or folder; {MODEL_HINT}")
    if hub.hub_offline():
        if not _in_hub_cache(model):
            raise OSError(f"config.model={model!r}: a hub id, but the hub is offline (HF_HUB_OFFLINE) and the model "
                          f"is not in the local cache; {MODEL_HINT}")  # fmt: skip
    elif not hub.hub_reachable():
        raise OSError(f"config.model={model!r} is a hub id but huggingface.co is unreachable; {MODEL_HINT}")


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the hub cache holds `repo_id`'s config.json (an offline run can load it from there)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 (an id the cache cannot even parse is not in it)
        return False


def load(config, *, head: str, num_labels: int | None = None, mesh=None) -> Model:
    """config.model with `head` ("classification", "regression" or "lm"); errors name config.model."""
    check_source(config.model)
    kw = dict(dtype=DTYPES[config.dtype], scan_layers=config.scan_layers, remat=config.remat, seed=config.seed)
    kw.update(mesh=mesh, rules=placement.config_rules(config), head=head)
    if num_labels is not None:
        kw["num_labels"] = num_labels
    try:
        module, params = models.from_pretrained(config.model, **kw)
        tokenizer = models.load_tokenizer(config.model)
    except (OSError, ValueError, KeyError) as e:
        raise type(e)(f"config.model={config.model!r}: {e}; {MODEL_HINT}") from e
    except Exception as e:  # a reader's own error on a damaged file (gguf, safetensors): name the file's key too
        raise ValueError(f"config.model={config.model!r}: {type(e).__name__}: {e}; {MODEL_HINT}") from e
    return quantize_base(config, Model(module, params, tokenizer, models.family(module), head))


def quantize_base(config, model: Model) -> Model:
    """The model with its block matrices quantized (config.base_quant "int8" / "nf4"; "none": unchanged).

    The targets are the "all-linear" kernels of the family (every Dense kernel inside the blocks; embeddings,
    norms and heads stay float). A run from before base_quant existed has none."""
    method = config.get("base_quant", "none")
    if method == "none":
        return model
    if str(config.model).endswith(".gguf"):
        logging.info("config.base_quant=%s: the GGUF's own quantized blocks were dequantized on load and are "
                     "quantized again here (two roundings)", method)  # fmt: skip
    params = mt.quantize(model.params, method, targets=models.targets("all-linear", model.family))
    held, was = mt.quantized_bytes(params)
    logging.info("base_quant=%s: the base matrices hold %.1f MB instead of %.1f MB (%.3fx)", method, held / 1e6,
                 was / 1e6, held / max(was, 1))  # fmt: skip
    return model._replace(params=params)


def mtlora_config(config, family: str) -> mt.MTLoRAConfig:
    """The one place where config.mtlora becomes an `mt.MTLoRAConfig` (validated again by mt.init)."""
    m = config.mtlora
    return mt.MTLoRAConfig(
        rank=m.rank,
        alpha=m.alpha,
        structure=m.structure,
        c_init=m.get("c_init", "kaiming_uniform"),  # a config.json saved before the key existed
        targets=models.targets(m.targets_preset, family) + tuple(m.extra_targets),
        dropout=m.dropout,
        fused=models.fused(m.targets_preset, family),
        stack_ndim=models.stack_ndim(family) if config.scan_layers else {},
    )


def trainable_heads(config, model: Model) -> tuple[str, ...]:
    """Regexes of the non-adapter leaves that train: the task head (none for an LM) and mtlora.extra_trainable."""
    return models.head_targets(model.family, model.head) + tuple(config.mtlora.extra_trainable)


def add_adapters(config, model: Model) -> Model:
    """mt.init with the config's adapters (then init_from's factors, never its head); errors name config.mtlora.

    config.init_from: a workdir or checkpoint of an earlier run, or a PEFT LoRA folder (adapter_config.json;
    structure "lora" only: a PEFT adapter has T = I)."""
    try:
        params = mt.init(model.params, mtlora_config(config, model.family), jax.random.key(config.seed))
    except ValueError as e:
        raise ValueError(f"config.mtlora ({config.mtlora.to_dict()}): {e}") from e
    if config.init_from and os.path.isfile(os.path.join(os.path.expanduser(config.init_from), "adapter_config.json")):
        params = _from_peft(config, model, params)
        logging.info("adapters initialised from the PEFT folder %s", config.init_from)
    elif config.init_from:
        params, folder = checkpoints.load_adapter_factors(config.init_from, params)
        logging.info("adapters (not the head) initialised from %s", folder)
    return model._replace(params=params)


def _from_peft(config, model: Model, params):
    """The config's adapters with A and B of the PEFT LoRA folder config.init_from (same targets, rank, scale)."""
    folder = os.path.expanduser(config.init_from)
    if config.mtlora.structure != "lora":
        raise ValueError(f"config.init_from={config.init_from!r} is a PEFT LoRA folder (T = I): it needs "
                         f"config.mtlora.structure='lora', not {config.mtlora.structure!r}")  # fmt: skip
    root, _, scanned = hf_names.LAYERS[model.family]
    stacked = scanned in model.params.get(root, {})
    base = models.unstack_params(model.params, model.family) if stacked else model.params
    peft = mt.load_peft(folder, base)  # PEFT names modules per layer: read unrolled, stack like ours
    peft = models.stack_params(peft, model.family) if stacked else peft
    mine = dict(named_leaves(params))
    out = {}
    for path, ad in named_leaves(peft):
        if not mt.is_adapted(ad):
            continue
        have = mine.get(path)
        if not mt.is_adapted(have):
            raise ValueError(f"config.init_from={config.init_from!r} adapts {path}, which config.mtlora does not")
        if (have.a.shape, have.b.shape, have.scale) != (ad.a.shape, ad.b.shape, ad.scale):
            raise ValueError(f"config.init_from={config.init_from!r}: {path} has rank {ad.a.shape[0]} and scale "
                             f"{ad.scale} there, {have.a.shape[0]} and {have.scale} in config.mtlora")  # fmt: skip
        out[path] = dataclasses.replace(have, a=ad.a, b=ad.b)
    return jax.tree_util.tree_map_with_path(lambda kp, x: out.get(path_str(kp), x), params, is_leaf=mt.is_adapted)
