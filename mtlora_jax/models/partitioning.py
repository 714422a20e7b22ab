"""Logical axes of every model parameter, and their mapping to mesh axes (FSDP and tensor parallelism).

Each weight's axes get logical names by its path (one table per family): a Dense kernel [d_in, d_out] of a
query projection is ("embed", "heads"), an FFN-in kernel ("embed", "mlp"), FFN-out ("mlp", "embed"), an
embedding table ("vocab", "embed"); norms, biases of the residual stream and task heads stay replicated. With
`nn.scan` the stacked "layers" axis comes first and is never split. `rules` map logical names to mesh axes
(default: embed -> "fsdp", heads / mlp / vocab -> "tensor"); names whose mesh axis is absent, or whose size
the mesh axis does not divide, stay replicated.

    spec = param_spec("encoder/layer_0/attention/query/kernel", (768, 768), "roberta", mesh)
    # PartitionSpec('fsdp', 'tensor') on a ("data", "fsdp", "tensor") mesh
"""

import re
from collections.abc import Mapping

from jax.sharding import Mesh, PartitionSpec

from mtlora_jax.models.hf_names import LAYERS, check_family

DEFAULT_RULES = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": "tensor"}

_ENCODER = (
    (r"embeddings/word_embeddings/embedding", ("vocab", "embed")),
    (r"embeddings/(position|token_type)_embeddings/embedding", (None, "embed")),
    (r"attention/(query|key|value)/kernel", ("embed", "heads")),
    (r"attention/(query|key|value)/bias", ("heads",)),
    (r"attention/output/dense/kernel", ("heads", "embed")),
    (r"intermediate/dense/kernel", ("embed", "mlp")),
    (r"intermediate/dense/bias", ("mlp",)),
    (r"output/dense/kernel", ("mlp", "embed")),
)
_TABLES = {
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "gpt2": (
        (r"wte/embedding", ("vocab", "embed")),
        (r"wpe/embedding", (None, "embed")),
        (r"attn/c_attn/kernel", ("embed", "heads")),
        (r"attn/c_attn/bias", ("heads",)),
        (r"attn/c_proj/kernel", ("heads", "embed")),
        (r"mlp/c_fc/kernel", ("embed", "mlp")),
        (r"mlp/c_fc/bias", ("mlp",)),
        (r"mlp/c_proj/kernel", ("mlp", "embed")),
    ),
    "llama": (
        (r"embed_tokens/embedding", ("vocab", "embed")),
        (r"self_attn/(q_proj|k_proj|v_proj)/kernel", ("embed", "heads")),
        (r"self_attn/(q_proj|k_proj|v_proj)/bias", ("heads",)),
        (r"self_attn/o_proj/kernel", ("heads", "embed")),
        (r"mlp/(gate_proj|up_proj)/kernel", ("embed", "mlp")),
        (r"mlp/(gate_proj|up_proj)/bias", ("mlp",)),
        (r"mlp/down_proj/kernel", ("mlp", "embed")),
        (r"lm_head/kernel", ("embed", "vocab")),
    ),
}


def logical_axes(path: str, ndim: int, family: str) -> tuple[str | None, ...]:
    """Logical axis names of the weight at `path` (None = replicated), "layers" first when scanned.

    Args:
      path: "/"-joined param path, e.g. "encoder/layers/attention/query/kernel".
      ndim: the weight's number of axes.
      family: "bert", "roberta", "gpt2" or "llama".
    """
    root, _, scanned = LAYERS[check_family(family)]
    axes = next((axes for pattern, axes in _TABLES[family] if re.search(rf"(^|/){pattern}$", path)), ())
    stacked = re.search(rf"(^|/){root}/{scanned}/", path) is not None and ndim == len(axes) + 1
    if stacked:
        axes = ("layers",) + axes
    if axes and len(axes) != ndim:
        raise ValueError(f"param {path!r} has {ndim} axes; the {family} partitioning table expects {len(axes)}")
    return axes or (None,) * ndim


def param_spec(
    path: str, shape: tuple[int, ...], family: str, mesh: Mesh, rules: Mapping[str, str] = DEFAULT_RULES
) -> PartitionSpec:
    """The PartitionSpec of one parameter on `mesh` (see the module docstring for the rules)."""
    entries = []
    for name, size in zip(logical_axes(path, len(shape), family), shape, strict=True):
        axis = rules.get(name) if name else None
        if axis not in mesh.shape or size % mesh.shape[axis] or axis in entries:
            axis = None
        entries.append(axis)
    return PartitionSpec(*entries)


def base_spec_fn(family: str, mesh: Mesh, rules: Mapping[str, str] = DEFAULT_RULES):
    """(path, weight) -> PartitionSpec, for `mt.partition_specs(params, base_spec_fn(...), mesh)`."""
    return lambda path, w: param_spec(path, tuple(w.shape), family, mesh, rules)
