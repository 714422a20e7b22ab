"""``from_pretrained``: one entry point from a checkpoint (HF folder, GGUF file, hub id) to (module, params).

Every param of our model is looked up in the checkpoint through :mod:`hf_names` (transposing
``nn.Linear`` weights). A param the checkpoint lacks raises, unless it belongs to a new task head,
which is initialised as HF does (kernels N(0, initializer_range), biases 0). Checkpoint tensors the
model does not use (an MLM head, a pooler under ``head=None``) are reported once in a warning.
"""

import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from mtlora_jax import paths
from mtlora_jax.models import config as config_lib
from mtlora_jax.models import hf_names, partitioning, presets, sources, stack
from mtlora_jax.models.encoder import Encoder
from mtlora_jax.models.gpt2 import GPT2
from mtlora_jax.models.llama import Llama

log = logging.getLogger(__name__)
# buffers some old checkpoints store that are not weights
_BUFFERS = re.compile(r".*(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq|embeddings\.position_ids)")


def build(family: str, config, head: str | None, num_labels: int | None, **kwargs):
    """The Flax module of a family and head, without params.

    Args:
      family: "bert", "roberta", "gpt2" or "llama".
      config: its EncoderConfig / GPT2Config / LlamaConfig.
      head: encoders None, "classification" or "regression"; decoders None or "lm".
      num_labels: classifier width (encoders; None means 2).
      **kwargs: module attributes dtype, param_dtype, scan_layers, remat.

    Returns:
      An ``Encoder``, ``GPT2`` or ``Llama`` module.
    """
    if family in ("bert", "roberta"):
        if head not in (None, "classification", "regression"):
            raise ValueError(f"head {head!r} is not valid for an encoder: None, 'classification' or 'regression'")
        return Encoder(config, head=head, num_labels=num_labels or 2, **kwargs)
    if head not in (None, "lm"):
        raise ValueError(f"head {head!r} is not valid for a {family} decoder: None or 'lm'")
    return (GPT2 if family == "gpt2" else Llama)(config, head=head, **kwargs)


def _backbone_prefix(tensors: dict, family: str) -> str:
    anchor = hf_names.ANCHOR[family]
    hits = sorted((k[: -len(anchor)] for k in tensors if k.endswith(anchor)), key=len)
    if not hits:
        raise KeyError(f"checkpoint has no '*{anchor}': not a {family} checkpoint")
    return hits[0]


def _legacy(name: str, tensors: dict) -> str:
    """Old BERT checkpoints name LayerNorm params gamma/beta."""
    if name in tensors or not name.endswith(("LayerNorm.weight", "LayerNorm.bias")):
        return name
    return name.removesuffix(".weight").removesuffix(".bias") + (".gamma" if name.endswith("weight") else ".beta")


def convert(
    tensors: dict[str, np.ndarray],
    shapes: dict,
    family: str,
    head: str | None,
    *,
    std: float,
    seed: int,
    param_dtype=jnp.float32,
) -> dict:
    """Fills an unrolled param tree from HF-named tensors.

    Args:
      tensors: {HF name: array in torch layout}. shapes: the model's param tree of ShapeDtypeStructs.
      family, head: which model; missing params of ``presets.head_targets(family, head)`` are new.
      std: init std of new head kernels. seed: numpy seed for them. param_dtype: stored dtype.

    Returns:
      The param tree (host numpy arrays in `param_dtype`); logs unused checkpoint tensors once.
    """
    prefix = _backbone_prefix(tensors, family)
    new_head = [re.compile(p) for p in presets.head_targets(family, head)]
    rng = np.random.default_rng(seed)
    used, missing = set(), []

    def fill(path, leaf):
        key = "/".join(p.key for p in path)
        rel, scope, transpose = hf_names.hf_tensor_name(key, family)
        name = _legacy(rel if scope == "top" else prefix + rel, tensors)
        if name not in tensors:
            if not any(p.fullmatch(key) for p in new_head):
                missing.append(f"{key} (checkpoint tensor {name!r})")
                return None
            kernel = key.endswith("/kernel")
            value = rng.normal(0.0, std, leaf.shape) if kernel else np.zeros(leaf.shape)
        else:
            used.add(name)
            value = tensors[name].T if transpose else tensors[name]
        if value.shape != leaf.shape:
            raise ValueError(f"{key}: checkpoint tensor {name!r} has shape {value.shape}, model wants {leaf.shape}")
        return np.asarray(value, dtype=param_dtype)  # stays on the host until `place`

    params = jax.tree_util.tree_map_with_path(fill, shapes)
    if missing:
        raise KeyError(f"{len(missing)} params missing from the checkpoint, e.g. {missing[:3]}")
    unused = sorted(k for k in tensors if k not in used and not _BUFFERS.fullmatch(k))
    if unused:
        log.warning(
            "%d checkpoint tensors not used by the %s model (head=%s): %s",
            len(unused),
            family,
            head,
            ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""),
        )
    return params


def _read(name_or_path, gguf_file):
    """(family, our config, HF-named tensors, stored num_labels or None) from any source."""
    kind, path = sources.resolve(name_or_path, gguf_file)
    if kind == "gguf":
        from mtlora_jax.models.gguf_io import read_gguf

        config, tensors = read_gguf(path)
        return "llama", config, tensors, None
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(path)
    family, config = config_lib.from_hf(hf)
    return family, config, sources.read_safetensors(path), getattr(hf, "num_labels", None)


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    head: str | None = None,
    num_labels: int | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    scan_layers: bool = False,
    remat: bool = False,
    gguf_file: str | None = None,
    seed: int = 0,
    mesh=None,
    rules=None,
):
    """Loads a pretrained checkpoint as a Flax module and its params.

    Args:
      name_or_path: HF folder (config.json + model.safetensors or sharded), ``.gguf`` file, or hub id.
      head: None (hidden states), "classification" / "regression" (encoders) or "lm" (decoders).
      num_labels: classifier width for "classification" (default: the checkpoint config's, else 2).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); param_dtype: storage dtype of the params.
      scan_layers: build the model with ``nn.scan`` and return stacked layer params.
      remat: rematerialise each layer's activations in the backward pass.
      gguf_file: the GGUF file name inside a folder / hub repo with several.
      seed: seed of the new head's HF-style init.
      mesh: a ``jax.sharding.Mesh``: each weight goes from the host straight to its shards on the mesh
        (``partitioning.param_spec``: FSDP over "fsdp", tensor parallelism over "tensor"), never a whole
        copy per device. None: every weight on the default device.
      rules: logical axis -> mesh axis (``partitioning.DEFAULT_RULES`` when None).

    Returns:
      (module, params): ``module.apply({"params": params}, input_ids, attention_mask)`` gives hidden
      states [b, t, d], logits [b, num_labels] / [b, t, vocab], or regression scores [b].
    """
    family, config, tensors, stored_labels = _read(name_or_path, gguf_file)
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, remat=remat)
    module = build(family, config, head, num_labels or stored_labels, scan_layers=False, **kwargs)
    ids = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), ids)["params"]
    params = convert(tensors, shapes, family, head, std=config.initializer_range, seed=seed, param_dtype=param_dtype)
    if scan_layers:
        params = stack.stack_params(params, family)  # numpy: stacked on the host
        module = module.clone(scan_layers=True)
    return module, place(params, family, mesh, rules)


def place(params, family: str, mesh=None, rules=None):
    """Host arrays -> device arrays: split on `mesh` by `partitioning.param_spec` (with `rules`, default
    ``partitioning.DEFAULT_RULES``), else the default device."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, params)
    rules = partitioning.DEFAULT_RULES if rules is None else rules

    def put(keypath, x):
        spec = partitioning.param_spec(paths.path_str(keypath), x.shape, family, mesh, rules)
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(put, params)


def load_tokenizer(name_or_path: str | os.PathLike, *, gguf_file: str | None = None):
    """The HF fast tokenizer stored beside the checkpoint (``tokenizer.json`` / vocab files, or the GGUF's)."""
    from transformers import AutoTokenizer

    kind, path = sources.resolve(name_or_path, gguf_file)
    if kind == "gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path)
